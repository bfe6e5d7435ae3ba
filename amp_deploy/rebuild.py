"""Ragged rebuild: slice each block's MLP to its kept neurons, save and load with no pickle.

A pruned checkpoint is one safetensors file. Its metadata holds the base model spec (source, name,
factory kwargs), the MLP sites and the kept width of every block: `load_pruned` builds the base
architecture with random weights, slices every MLP to those widths, then loads the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from amp_deploy._private import atomic_path
from amp_deploy.errors import UserError
from amp_deploy.families import Loaded, MlpSite, load_model, safetensors_metadata, site_dicts

FORMAT = "amp-deploy.pruned/1"


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep])
    return new


def _cols(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _norm(norm: nn.LayerNorm, keep: torch.Tensor) -> nn.LayerNorm:
    new = nn.LayerNorm(len(keep), eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                       bias=norm.bias is not None, device=norm.weight.device if norm.weight is not None else None)
    if norm.elementwise_affine:
        with torch.no_grad():
            new.weight.copy_(norm.weight[keep])
            if norm.bias is not None:
                new.bias.copy_(norm.bias[keep])
    return new.to(dtype=norm.weight.dtype) if norm.weight is not None else new


def sliced_modules(mods: dict[str, nn.Module], site: MlpSite, keep: torch.Tensor) -> dict[str, nn.Module]:
    """New modules for one MLP keeping hidden neurons `keep` (the same index in gate and value)."""
    keep = keep.to(mods["fc_out"].weight.device)
    h = mods["fc_out"].in_features
    rows = torch.cat([keep, keep + h]) if site.packed else keep
    out = {"fc_in": _rows(mods["fc_in"], rows), "fc_out": _cols(mods["fc_out"], keep)}
    if "gate" in mods:
        out["gate"] = _rows(mods["gate"], keep)
    if "norm" in mods:
        out["norm"] = _norm(mods["norm"], keep)
    return out


def set_modules(loaded: Loaded, i: int, mods: dict[str, nn.Module]) -> None:
    block = loaded.block_list()[i]
    site = loaded.sites[i]
    for key, mod in mods.items():
        parent, _, attr = getattr(site, key).rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, mod)


def prune_block(loaded: Loaded, i: int, keep: torch.Tensor) -> None:
    """Slice block i's MLP in place to the hidden neurons `keep`."""
    set_modules(loaded, i, sliced_modules(loaded.mlp_modules(i), loaded.sites[i], keep))


def keep_top(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the `width` highest scores, in ascending index order (stable on ties)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:width]).values


def apply_widths(loaded: Loaded, scores: list[torch.Tensor] | None, widths: list[int]) -> None:
    """Prune every block to its width, keeping the top-scored neurons (or the first ones)."""
    for i, w in enumerate(widths):
        if w != loaded.widths()[i]:
            keep = keep_top(scores[i], w) if scores is not None else torch.arange(w)
            prune_block(loaded, i, keep)


def save_pruned(loaded: Loaded, path: str | Path, original_widths: list[int]) -> None:
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
    state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
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
