"""The pruned checkpoint: one safetensors file that rebuilds its exact architecture with no pickle.

Its metadata holds the base model spec (source, name, factory kwargs), the MLP sites and the kept
width of every block (and, where heads were cut, each block's head count): `load_pruned` builds the
base architecture with random weights, slices every MLP to those widths (and every attention to those
heads), then loads the tensors. A checkpoint with no head counts keeps every head. `load_any` loads a model from a recipe's model
section, one of our own checkpoints included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from torch import nn

from amp_deploy.errors import UserError
from amp_deploy.files import atomic_path
from amp_deploy.prune.families import Loaded, load_model, safetensors_metadata, site_dicts
from amp_deploy.prune.rebuild import apply_heads, apply_widths

FORMAT = "amp-deploy.pruned/1"
ModelSource = Literal["timm", "open_clip", "transformers", "checkpoint"]  # the factories, and a pruned.safetensors of ours


def save_pruned(loaded: Loaded, path: str | Path, original_widths: list[int],
                original_heads: list[int] | None = None) -> None:
    """Write `loaded` (pruned) to `path` atomically, with what rebuilds it in the metadata (and what
    it was pruned from: the original widths, and heads where known)."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "base": json.dumps(loaded.spec),
        "blocks": loaded.blocks,
        "sites": json.dumps(site_dicts(loaded.sites)),
        "widths": json.dumps(loaded.widths()),
        "original_widths": json.dumps(original_widths),
        "output": loaded.output,
    }
    heads = loaded.heads()
    if heads is not None:
        meta["heads"] = json.dumps(heads)
    if original_heads is not None:
        meta["original_heads"] = json.dumps(original_heads)
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
    base = json.loads(meta["base"])
    loaded = load_model(base["source"], base["name"], False, base["kwargs"], base.get("mlp_sites"))
    apply_widths(loaded, None, json.loads(meta["widths"]))
    if "heads" in meta:
        apply_heads(loaded, None, json.loads(meta["heads"]))
    try:
        loaded.model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the recorded architecture: {' '.join(str(e).split())[:200]}") from None
    loaded.model.eval()
    loaded.spec = base
    return loaded


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
