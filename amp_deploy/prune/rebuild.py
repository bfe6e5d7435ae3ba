"""Ragged rebuild: slice each block's MLP to its kept hidden neurons (AMP, step 3).

fc_in loses rows (both halves of a packed gated Linear, at the same neuron index), fc_out the
matching columns; a separate gate Linear and a LayerNorm over the hidden neurons are sliced alike.
Attention heads are cut the same way (`prune.heads`): the kept heads' rows of the query, key and
value projections (each of a packed qkv's three parts) and their columns of the output projection,
head size unchanged. Only widths and head counts change, so the result still loads from the base
architecture plus both lists.
"""

from __future__ import annotations

import torch
from torch import nn

from amp_deploy.prune.compensate import Compensator
from amp_deploy.prune.families import AttnSite, Loaded, MlpSite
from amp_deploy.prune.shape import BlockShape, heads_of, widths_of


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
    """Put `mods` (from `sliced_modules`, or the originals back) into block i."""
    block = loaded.block_list()[i]
    site = loaded.sites[i]
    for key, mod in mods.items():
        parent, _, attr = getattr(site, key).rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, mod)


def prune_block(loaded: Loaded, i: int, keep: torch.Tensor, comp: Compensator | None = None) -> None:
    """Slice block i's MLP in place to the hidden neurons `keep` (its output layer re-fitted by `comp`)."""
    set_modules(loaded, i, cut_mlp(loaded, i, loaded.mlp_modules(i), keep, comp))


def cut_mlp(loaded: Loaded, i: int, original: dict[str, nn.Module], keep: torch.Tensor,
            comp: Compensator | None = None) -> dict[str, nn.Module]:
    """Block i's MLP modules (`original`) sliced to `keep`, the output layer re-fitted by `comp` (if any)."""
    cut = sliced_modules(original, loaded.sites[i], keep)
    return comp.mlp(i, original, keep, cut) if comp is not None else cut


def cut_attention(loaded: Loaded, i: int, original: dict[str, nn.Module], keep_heads: torch.Tensor,
                  comp: Compensator | None = None) -> dict[str, nn.Module]:
    """Block i's attention (`original`) cut to heads `keep_heads`, the output projection re-fitted by `comp`."""
    site = loaded.attn[i]
    cut = sliced_attention(original, site, keep_heads)
    return comp.attn(i, original, head_channels(keep_heads.cpu(), site.head_dim), cut) if comp is not None else cut


def keep_top(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the `width` highest scores, in ascending index order (stable on ties)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:width]).values


def apply_widths(loaded: Loaded, scores: list[torch.Tensor] | None, widths: list[int],
                 comp: Compensator | None = None) -> None:
    """Prune every block to its width in place, keeping the top-scored neurons (or, with no
    scores, the first ones: the layout of a checkpoint being rebuilt); `comp` re-fits each cut
    block's output layer."""
    for i, w in enumerate(widths):
        if w != loaded.widths()[i]:
            keep = keep_top(scores[i], w) if scores is not None else torch.arange(w)
            prune_block(loaded, i, keep, comp)


def head_channels(keep_heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channels of heads `keep_heads` in a heads * head_dim layout."""
    return (keep_heads[:, None] * head_dim + torch.arange(head_dim, device=keep_heads.device)).flatten()


def sliced_attention(mods: dict[str, nn.Module], site: AttnSite, keep_heads: torch.Tensor) -> dict[str, nn.Module]:
    """New modules for one attention keeping heads `keep_heads` (ascending)."""
    keep = head_channels(keep_heads.to(mods["proj"].weight.device), site.head_dim)
    out = {"proj": _cols(mods["proj"], keep)}
    if "qkv" in mods:
        inner = mods["proj"].in_features
        out["qkv"] = _rows(mods["qkv"], torch.cat([keep, keep + inner, keep + 2 * inner]))
    for key in ("q", "k", "v", "gate"):
        if key in mods:
            out[key] = _rows(mods[key], keep)
    if "norm" in mods:
        out["norm"] = _norm(mods["norm"], keep)
    for name in site.biases:  # per-channel tensors outside a Linear: a Parameter stays one, a buffer a buffer
        t = mods[name]
        out[name] = nn.Parameter(t.detach()[keep].clone(), t.requires_grad) if isinstance(t, nn.Parameter) \
            else t[keep].clone()
    return out


def set_attention(loaded: Loaded, i: int, mods: dict[str, nn.Module]) -> None:
    """Put `mods` (from `sliced_attention`, or the originals back) into block i's attention, and
    set the attention module's head count to match."""
    block = loaded.block_list()[i]
    site = loaded.attn[i]
    attn = block.get_submodule(site.module)
    for key, mod in mods.items():
        if key in site.biases:
            setattr(attn, key, mod)
            continue
        parent, _, attr = getattr(site, key).rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, mod)
    if site.ragged == "eva":
        from amp_deploy.prune.families import ragged_eva_class

        attn.__class__ = ragged_eva_class()  # the same forward, reshaped to the heads' channels
    inner = mods["proj"].in_features
    for name in site.count_attrs:
        setattr(attn, name, inner // site.head_dim)
    for name in site.dim_attrs:
        setattr(attn, name, inner)


def apply_heads(loaded: Loaded, scores: list[torch.Tensor] | None, heads: list[int] | None,
                comp: Compensator | None = None) -> None:
    """Cut every block's attention to its head count in place, keeping the top-scored heads (or, with
    no scores, the first ones: a checkpoint being rebuilt). None keeps every head."""
    if heads is None:
        return
    now = loaded.heads()
    if now is None:
        raise ValueError("this model's attention is of no known kind: its heads cannot be cut")
    for i, h in enumerate(heads):
        if h != now[i]:
            keep = keep_top(scores[i], h) if scores is not None else torch.arange(h)
            set_attention(loaded, i, cut_attention(loaded, i, loaded.attn_modules(i), keep, comp))


def apply_shapes(loaded: Loaded, shapes: list[BlockShape], scores: list[torch.Tensor] | None = None,
                 head_scores: list[torch.Tensor] | None = None, comp: Compensator | None = None) -> None:
    """Cut every block to its shape in place: the MLP to its width (top-scored neurons), the attention
    to its head count (top-scored heads); with no scores, the first ones (a checkpoint being rebuilt).
    A shape whose heads are None keeps every head. `comp` (prune.compensate) re-fits the layer that
    reads each cut block's units."""
    apply_widths(loaded, scores, widths_of(shapes), comp)
    apply_heads(loaded, head_scores, heads_of(shapes), comp)
