"""amp-deploy: prune the MLPs of vision transformers with AMP and ship them as ONNX / TensorRT.

The package is laid out as the pipeline runs: `prune/` (AMP itself: model families, scores, width
search, ragged rebuild), `deploy/` (ONNX export, TensorRT engines, runtimes, Triton), `measure/`
(metrics, the validate stage's measuring, report, compare, plots) and `pipeline/` (the stage table,
the output folder, manifest, lock, preflight, torchrun). `recipe.py`, `checkpoint.py`, `data.py`
and `cli.py` sit on top; `errors.py`, `files.py` and `numerics.py` at the bottom.
"""

from amp_deploy._version import __version__
from amp_deploy.checkpoint import load_pruned, load_pruned_model, save_pruned
from amp_deploy.data import Data, Split
from amp_deploy.errors import GateFailed, UserError
from amp_deploy.prune.families import Loaded, MlpSite, find_sites, load_model
from amp_deploy.prune.rebuild import apply_shapes, apply_widths, prune_block
from amp_deploy.prune.score import entropy, loss_fn, taylor_scores
from amp_deploy.prune.search import SearchResult, adaptive_widths, uniform_widths, width_grid
from amp_deploy.prune.shape import BlockShape
from amp_deploy.recipe import Recipe, load_recipe

__all__ = [
    "BlockShape", "Data", "GateFailed", "Loaded", "MlpSite", "Recipe", "SearchResult", "Split", "UserError",
    "__version__", "adaptive_widths", "apply_shapes", "apply_widths", "entropy", "find_sites", "load_model", "load_pruned", "load_pruned_model",
    "load_recipe", "loss_fn", "prune_block", "save_pruned", "taylor_scores", "uniform_widths", "width_grid",
]
