"""The pruned checkpoint: one safetensors file that rebuilds its exact architecture with no pickle.

Its metadata holds the base model spec (source, name, factory kwargs), the MLP sites and the shape
of every block (`shapes`: its MLP width and attention head count, `prune.shape`), and the shapes it
was pruned from: `load_pruned` builds the base architecture with random weights, cuts every block to
its shape, then loads the tensors. `widths` is written beside the shapes for scripts that read it
(DESIGN.md); amp-deploy reads the shapes, and a checkpoint from before them (widths, and heads where
cut) as those. `load_any` loads a model from a recipe's model section, one of our own checkpoints
included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from torch import nn

from amp_deploy.errors import UserError, first_line
from amp_deploy.files import atomic_path
from amp_deploy.prune.families import Loaded, load_model, safetensors_metadata, site_dicts
from amp_deploy.prune.rebuild import apply_shapes
from amp_deploy.prune.shape import BlockShape, recorded_shapes, to_json, widths_of

FORMAT = "amp-deploy.pruned/1"
ModelSource = Literal["timm", "open_clip", "transformers", "checkpoint"]  # the factories, and a pruned.safetensors of ours


def save_pruned(loaded: Loaded, path: str | Path, original: list[BlockShape]) -> None:
    """Write `loaded` (pruned) to `path` atomically, with what rebuilds it in the metadata (and the
    shapes it was pruned from)."""
    from safetensors.torch import save_file

    shapes = loaded.shapes()
    meta = {
        "format": FORMAT,
        "base": json.dumps(loaded.spec),
        "blocks": loaded.blocks,
        "sites": json.dumps(site_dicts(loaded.sites)),
        "shapes": json.dumps(to_json(shapes)),
        "original_shapes": json.dumps(to_json(original)),
        "widths": json.dumps(widths_of(shapes)),  # for scripts (DESIGN.md); the shapes are what is read
        "output": loaded.output,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a pruned checkpoint; a UserError for any other file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: pruned checkpoint not found")
    meta = safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a pruned checkpoint of amp-deploy (metadata format {meta.get('format')!r})")
    return meta


def load_pruned_model(path: str | Path) -> Loaded:
    """Rebuild the exact pruned architecture from the checkpoint's metadata and load its weights."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        base = json.loads(meta["base"])
        factory = (base["source"], base["name"], base["kwargs"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: the metadata's 'base' is not the JSON amp-deploy writes (edited?)") from None
    loaded = load_model(*factory[:2], False, factory[2], base.get("mlp_sites"))
    apply_shapes(loaded, checked_shapes(meta, loaded.shapes(), path)[0])
    try:
        loaded.model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the recorded architecture: {' '.join(str(e).split())[:200]}") from None
    loaded.model.eval()
    loaded.spec = base
    return loaded


def checked_shapes(meta: dict[str, str], base: list[BlockShape], path) -> tuple[list[BlockShape], list[BlockShape]]:
    """The checkpoint's shapes and the shapes it was pruned from, checked against each other, against
    the `widths` written beside them for scripts, and against the base model's (`base`): a UserError
    naming the file and the inconsistency for metadata that was edited or damaged."""
    def bad(what: str) -> UserError:
        return UserError(f"{path}: the metadata's {what} (edited or damaged?)")

    try:
        shapes, original = recorded_shapes(meta)
    except (TypeError, ValueError, KeyError) as e:
        raise bad(f"shapes are not a JSON list of [width, heads] pairs ({first_line(e, 80)})") from None
    if shapes is None:
        raise bad("shapes are missing")
    original = original or base
    if len(shapes) != len(base) or len(original) != len(base):
        raise bad(f"shapes list {len(shapes)} blocks (the pruned) and {len(original)} (the original); the base "
                  f"model has {len(base)}")
    for i, (s, o, b) in enumerate(zip(shapes, original, base)):
        if not 1 <= s.width <= o.width <= b.width:
            raise bad(f"block {i}: width {s.width} of {o.width} does not fit the base model's {b.width}")
        if s.heads is not None:
            top = o.heads if o.heads is not None else b.heads
            if b.heads is None or not 1 <= s.heads <= top <= b.heads:
                raise bad(f"block {i}: {s.heads} heads of {top} do not fit the base model's {b.heads}")
    if "widths" in meta:
        try:
            widths = [int(w) for w in json.loads(meta["widths"])]
        except (TypeError, ValueError):
            raise bad("widths are not a JSON list of integers") from None
        if widths != widths_of(shapes):
            raise bad(f"widths {widths} disagree with its shapes' {widths_of(shapes)}")
    return shapes, original


def load_pruned(path: str | Path) -> nn.Module:
    """Load a pruned.safetensors written by amp-deploy as a ready-to-run module (eval mode)."""
    return load_pruned_model(path).model


def load_any(source: ModelSource, name: str | None, pretrained: bool | str, kwargs: dict[str, Any],
             mlp_sites: dict[str, Any] | None = None) -> Loaded:
    """A model from a recipe's model section: a factory's model, or (source "checkpoint") the pruned
    checkpoint at `pretrained`."""
    if source == "checkpoint":
        return load_pruned_model(str(pretrained))
    return load_model(source, name or "", pretrained, kwargs, mlp_sites)
