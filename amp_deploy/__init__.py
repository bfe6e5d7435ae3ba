"""amp-deploy: prune the MLPs of vision transformers with AMP and ship them as ONNX / TensorRT."""

__version__ = "0.1.0"

from amp_deploy.errors import GateFailed, UserError  # noqa: E402
from amp_deploy.families import MlpSite, find_sites, load_model  # noqa: E402
from amp_deploy.rebuild import load_pruned, prune_block, save_pruned  # noqa: E402
from amp_deploy.recipe import Recipe, load_recipe  # noqa: E402
from amp_deploy.score import entropy, taylor_scores  # noqa: E402
from amp_deploy.search import adaptive_widths, uniform_widths, width_grid  # noqa: E402

__all__ = [
    "GateFailed", "MlpSite", "Recipe", "UserError", "adaptive_widths", "entropy", "find_sites",
    "load_model", "load_pruned", "load_recipe", "prune_block", "save_pruned", "taylor_scores",
    "uniform_widths", "width_grid",
]
