"""Model families: loader functions and MLP site finders, listed in one place.

A loader returns a `Loaded`: the module to prune (for open_clip, the visual tower), the path of its
transformer block list, the MLP sites inside each block, what its output is (class logits or an
embedding), and the model's own eval transform. Families differ only in those facts, so they are
plain functions in dicts, not classes.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from amp_deploy.errors import UserError, first_line
from amp_deploy.prune.shape import BlockShape, shapes_of

Output = Literal["logits", "embedding"]
FactorySource = Literal["timm", "open_clip", "transformers"]  # model factories; amp_deploy.checkpoint adds our own files


@dataclass(frozen=True)
class MlpSite:
    """Where one block's MLP lives, as module paths relative to the block.

    fc_in maps d -> h (or d -> 2h when `packed`: value and gate halves in one Linear), fc_out maps
    h -> d. `gate` is a separate d -> h Linear (timm SwiGLU's fc1_g) and `norm` a LayerNorm over the
    h hidden neurons (EVA02); both are sliced with the same neuron indices as fc_in.
    """

    fc_in: str
    fc_out: str
    packed: bool = False
    gate: str | None = None
    norm: str | None = None


@dataclass(frozen=True)
class AttnSite:
    """Where one block's self-attention lives, as module paths relative to the block.

    `proj` maps heads * head_dim -> d; its input is the heads' outputs side by side, so a head is a
    slice of `head_dim` channels there (where heads are scored and cut). The queries, keys and values
    come from one packed Linear `qkv` (rows [q | k | v], timm) or three Linears `q`, `k`, `v`
    (transformers); `norm` is a LayerNorm over the heads' channels (timm's scale_norm) and `gate` a
    d -> heads * head_dim Linear (timm's gated attention), both cut with the heads. Per-head q/k
    norms and rotary embeddings act inside a head and are untouched. `module` is the attention
    module, whose `count_attrs` hold the head count and `dim_attrs` heads * head_dim; `biases` are
    its per-channel bias tensors outside any Linear (EVA's q_bias, k_bias, v_bias beside a bias-free
    packed qkv), cut with the heads. `ragged` names the module's kind when its own forward cannot run
    fewer heads and the module is given an equivalent one that can on the first cut ("eva": timm's
    EvaAttention reshapes the heads' output to the block width).
    """

    module: str
    proj: str
    head_dim: int
    qkv: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    norm: str | None = None
    gate: str | None = None
    count_attrs: tuple[str, ...] = ()
    dim_attrs: tuple[str, ...] = ()
    biases: tuple[str, ...] = ()
    ragged: str | None = None


@dataclass
class Loaded:
    """A model ready to prune: the module, where its blocks and MLPs are, and how to feed it."""

    model: nn.Module
    blocks: str  # path of the block list inside `model`
    sites: list[MlpSite]
    output: Output
    transform: Callable[[Any], torch.Tensor]
    input_size: tuple[int, int, int]
    spec: dict[str, Any] = field(default_factory=dict)  # {source, name, kwargs}: enough to rebuild
    # CLIP models: prompts -> text embeddings from the (unpruned) text tower, for zero-shot and the
    # image-text criterion; None for image-only models
    encode_text: Callable[[list[str]], torch.Tensor] | None = field(default=None, repr=False)
    # each block's attention (found once: cutting heads replaces its Linears, never its layout), or None
    # where a block's attention is of no known kind (its heads cannot be cut)
    attn: list[AttnSite] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.attn = find_attn_sites(self.block_list())

    def block_list(self) -> nn.Module:
        return self.model.get_submodule(self.blocks)

    def mlp_modules(self, i: int) -> dict[str, nn.Module]:
        block = self.block_list()[i]
        s = self.sites[i]
        names = {"fc_in": s.fc_in, "fc_out": s.fc_out, "gate": s.gate, "norm": s.norm}
        return {k: block.get_submodule(v) for k, v in names.items() if v}

    def widths(self) -> list[int]:
        return [self.mlp_modules(i)["fc_out"].in_features for i in range(len(self.sites))]

    def attn_modules(self, i: int) -> dict[str, nn.Module]:
        block = self.block_list()[i]
        s = self.attn[i]
        names = {"proj": s.proj, "qkv": s.qkv, "q": s.q, "k": s.k, "v": s.v, "norm": s.norm, "gate": s.gate}
        out: dict = {k: block.get_submodule(v) for k, v in names.items() if v}
        attn = block.get_submodule(s.module)
        return out | {b: getattr(attn, b) for b in s.biases}  # tensors, not modules

    def heads(self) -> list[int] | None:
        """Attention heads per block (None where they are not known)."""
        if self.attn is None:
            return None
        blocks = self.block_list()
        return [blocks[i].get_submodule(s.proj).in_features // s.head_dim for i, s in enumerate(self.attn)]

    def shapes(self) -> list[BlockShape]:
        """Each block's MLP width and head count (heads None where they are not known)."""
        return shapes_of(self.widths(), self.heads())

    def shared_copy(self) -> Loaded:
        """A copy whose modules are new but whose weights are this model's own tensors (no weights copied):
        what a search prunes and throws away. Pruning replaces a block's modules (and an attention's bias
        tensors) with sliced ones and never writes into a weight, so this model is left as it was; moving
        or training the copy would move or train both."""
        memo = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        return copy.deepcopy(self, memo)


# --- site finders: one per MLP shape, tried in order on each block's `mlp` ------------------------


def _timm_swiglu(mlp: nn.Module, prefix: str) -> MlpSite | None:
    if hasattr(mlp, "fc1_g") and hasattr(mlp, "fc1_x"):
        norm = mlp.norm if isinstance(getattr(mlp, "norm", None), nn.LayerNorm) else None
        return MlpSite(f"{prefix}.fc1_x", f"{prefix}.fc2", gate=f"{prefix}.fc1_g",
                       norm=f"{prefix}.norm" if norm is not None else None)
    return None


def _timm_mlp(mlp: nn.Module, prefix: str) -> MlpSite | None:
    if not (isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)):
        return None
    packed = mlp.fc1.out_features == 2 * mlp.fc2.in_features  # GluMlp, SwiGLUPacked
    norm = getattr(mlp, "norm", None)
    has_norm = isinstance(norm, nn.LayerNorm) and norm.normalized_shape[0] == mlp.fc2.in_features
    return MlpSite(f"{prefix}.fc1", f"{prefix}.fc2", packed=packed, norm=f"{prefix}.norm" if has_norm else None)


def _open_clip_mlp(mlp: nn.Module, prefix: str) -> MlpSite | None:
    if isinstance(getattr(mlp, "c_fc", None), nn.Linear) and isinstance(getattr(mlp, "c_proj", None), nn.Linear):
        norm = getattr(mlp, "ln", None)
        has_norm = isinstance(norm, nn.LayerNorm)  # open_clip scale_fc: LayerNorm over hidden neurons
        return MlpSite(f"{prefix}.c_fc", f"{prefix}.c_proj", norm=f"{prefix}.ln" if has_norm else None)
    return None


def _gated_proj(mlp: nn.Module, prefix: str) -> MlpSite | None:
    """Llama-style gated MLPs (transformers' Dinov2SwiGLUFFN): gate_proj, up_proj, down_proj."""
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return MlpSite(f"{prefix}.up_proj", f"{prefix}.down_proj", gate=f"{prefix}.gate_proj")
    return None


def _packed_weights(mlp: nn.Module, prefix: str) -> MlpSite | None:
    """transformers 4.x Dinov2SwiGLUFFN: weights_in (d -> 2h, value and gate) and weights_out."""
    if isinstance(getattr(mlp, "weights_in", None), nn.Linear) and isinstance(getattr(mlp, "weights_out", None), nn.Linear):
        return MlpSite(f"{prefix}.weights_in", f"{prefix}.weights_out", packed=True)
    return None


SITE_FINDERS = [_timm_swiglu, _timm_mlp, _open_clip_mlp, _gated_proj, _packed_weights]
BLOCK_LISTS = ["blocks", "transformer.resblocks", "trunk.blocks"]


SPEC_HINT = ("describe them in the recipe, e.g. model.mlp_sites: {blocks: encoder.layers, fc_in: mlp.fc1, "
             "fc_out: mlp.fc2, packed: false, gate: null, norm: null}")


def sites_from_spec(model: nn.Module, spec: dict[str, Any]) -> tuple[str, list[MlpSite]]:
    """Sites from a recipe's `model.mlp_sites`, checked against the model."""
    try:
        blocks = model.get_submodule(spec["blocks"])
    except AttributeError:
        raise UserError(f"model.mlp_sites.blocks: {type(model).__name__} has no submodule {spec['blocks']!r}") from None
    site = MlpSite(spec["fc_in"], spec["fc_out"], bool(spec.get("packed")), spec.get("gate"), spec.get("norm"))
    for i, block in enumerate(blocks):
        for key in ("fc_in", "fc_out", "gate", "norm"):
            path = getattr(site, key)
            if not path:
                continue
            try:
                mod = block.get_submodule(path)
            except AttributeError:
                raise UserError(f"model.mlp_sites.{key}: block {i} has no submodule {path!r}") from None
            want = nn.LayerNorm if key == "norm" else nn.Linear
            if not isinstance(mod, want):
                raise UserError(f"model.mlp_sites.{key}: {path!r} in block {i} is a {type(mod).__name__}, "
                                f"not an nn.{want.__name__}")
    return spec["blocks"], [site] * len(blocks)


def find_sites(model: nn.Module, spec: dict[str, Any] | None = None) -> tuple[str, list[MlpSite]]:
    """Find the block list and each block's MLP; raise UserError when the model is unknown.

    Returns the block list's path in `model` and one `MlpSite` per block. `spec` (a recipe's
    `model.mlp_sites`) names them for a family that is not found automatically.
    """
    if spec:
        return sites_from_spec(model, spec)
    known = [p for p in BLOCK_LISTS if _has(model, p)]
    others = [n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and n not in known]
    for path in known + others:  # the usual places first, then any list of blocks that all hold an MLP
        blocks = model.get_submodule(path)
        sites = [_site_of(block) for block in blocks]
        if sites and all(sites):
            return path, sites
    raise UserError(
        f"{type(model).__name__}: no transformer blocks with a known MLP found (looked for "
        f"{', '.join(BLOCK_LISTS)} with mlp.fc1/fc2, mlp.fc1_g/fc1_x/fc2 or mlp.c_fc/c_proj); {SPEC_HINT}"
    )


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _site_of(block: nn.Module) -> MlpSite | None:
    mlp = getattr(block, "mlp", None)
    if mlp is None:  # transformers 4.x ViT: intermediate.dense (d -> h), output.dense (h -> d)
        inter, out = getattr(block, "intermediate", None), getattr(block, "output", None)
        if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None), nn.Linear):
            return MlpSite("intermediate.dense", "output.dense")
        return None
    for finder in SITE_FINDERS:
        site = finder(mlp, "mlp")
        if site:
            return site
    return None


# --- attention site finders ------------------------------------------------------------------------


def _timm_attention(block: nn.Module) -> AttnSite | None:
    """timm's Attention (ViT, DeiT, ...): packed qkv, proj, num_heads and attn_dim attributes, and its
    forward reshapes to attn_dim (not the block width), so fewer heads run as they are."""
    from timm.layers import Attention

    attn = getattr(block, "attn", None)
    if not isinstance(attn, Attention) or not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
        return None
    return AttnSite("attn", "attn.proj", int(attn.head_dim), qkv="attn.qkv",
                    norm="attn.norm" if isinstance(attn.norm, nn.LayerNorm) else None,
                    gate="attn.gate" if isinstance(getattr(attn, "gate", None), nn.Linear) else None,
                    count_attrs=("num_heads",), dim_attrs=("attn_dim",))


def _hf_attention(block: nn.Module) -> AttnSite | None:
    """transformers' vision attention (ViT, Dinov2: attention.q_proj/k_proj/v_proj/o_proj; CLIP,
    SigLIP: self_attn.q_proj/k_proj/v_proj/out_proj): their forward reshapes to (-1, head_dim)."""
    for name, out in (("attention", "o_proj"), ("self_attn", "out_proj")):
        attn = getattr(block, name, None)
        if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear)
                                   for n in ("q_proj", "k_proj", "v_proj", out)):
            continue
        if name == "self_attn" and not hf_ragged_self_attn():
            return None  # CLIP, SigLIP on transformers 4.x: reshaped to the block width, fewer heads cannot run
        head_dim = getattr(attn, "head_dim", None)
        if not isinstance(head_dim, int) or getattr(attn, out).in_features % head_dim:
            return None
        counts = tuple(a for a in ("num_attention_heads", "num_heads") if isinstance(getattr(attn, a, None), int))
        dims = ("all_head_size",) if hasattr(attn, "all_head_size") else ()  # embed_dim is the block's width
        return AttnSite(name, f"{name}.{out}", head_dim, q=f"{name}.q_proj", k=f"{name}.k_proj", v=f"{name}.v_proj",
                        count_attrs=counts, dim_attrs=dims)
    return None


def _eva_attention(block: nn.Module) -> AttnSite | None:
    """timm's EvaAttention (EVA02, EVA02-CLIP, DINOv3): packed qkv with separate q/v biases (k's a
    zero buffer) or three Linears, rotary embeddings and q/k norms inside a head, an optional scale
    norm over the heads' channels. Its forward reshapes the heads' output to the block width, so a
    cut module runs an equivalent forward that reshapes to the heads' channels (`ragged_eva_class`)."""
    from timm.models.eva import EvaAttention

    attn = getattr(block, "attn", None)
    if not isinstance(attn, EvaAttention) or not isinstance(attn.proj, nn.Linear) or attn.qkv_bias_separate:
        return None
    packed = isinstance(attn.qkv, nn.Linear)
    if not packed and not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        return None
    return AttnSite("attn", "attn.proj", int(attn.head_dim), qkv="attn.qkv" if packed else None,
                    q=None if packed else "attn.q_proj", k=None if packed else "attn.k_proj",
                    v=None if packed else "attn.v_proj",
                    norm="attn.norm" if isinstance(attn.norm, nn.LayerNorm) else None,
                    gate="attn.gate" if isinstance(attn.gate, nn.Linear) else None, count_attrs=("num_heads",),
                    biases=("q_bias", "k_bias", "v_bias") if packed and attn.q_bias is not None else (),
                    ragged="eva")


@functools.cache
def ragged_eva_class() -> type:
    """EvaAttention with the one change a cut module needs: the heads' output reshaped to
    heads * head_dim channels instead of the block width (the same outputs with every head)."""
    from timm.models import eva

    class RaggedEvaAttention(eva.EvaAttention):
        def forward(self, x, rope=None, attn_mask=None, is_causal=False):
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            if self.qkv is not None:
                if self.q_bias is None:
                    qkv = self.qkv(x)
                else:
                    qkv = eva.F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))
                q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
                q = torch.cat([q[:, :, :npt, :], eva.apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)],
                              dim=2).type_as(v)
                k = torch.cat([k[:, :, :npt, :], eva.apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)],
                              dim=2).type_as(v)
            if self.fused_attn:
                x = eva.F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                       dropout_p=self.attn_drop.p if self.training else 0.0)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1)
                attn = eva.maybe_add_mask(attn, eva.resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
                x = self.attn_drop(attn.softmax(dim=-1)) @ v
            x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    return RaggedEvaAttention


class PackedSelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention as open_clip's towers call it (`attn(x, x, x,
    need_weights=False, attn_mask=...)[0]`), with its packed in-projection as a Linear `in_proj` and
    `out_proj` called as a module, so that heads are scored at its input and cut like timm's qkv; the
    head count may leave the block width (heads * head_dim channels inside). The same outputs as the
    module it replaces (scaled dot-product attention, as torch's fast path); an old state dict's
    `in_proj_weight` / `in_proj_bias` load into `in_proj`."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.batch_first = mha.num_heads, mha.head_dim, mha.batch_first
        self.dropout = mha.dropout
        w = mha.in_proj_weight
        self.in_proj = nn.Linear(w.shape[1], w.shape[0], bias=mha.in_proj_bias is not None, device=w.device,
                                 dtype=w.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(w)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
        self.out_proj = mha.out_proj
        self._register_load_state_dict_pre_hook(self._old_names)

    @staticmethod
    def _old_names(state, prefix, *_args) -> None:
        for old, new in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
            if prefix + old in state:
                state[prefix + new] = state.pop(prefix + old)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None,
                key_padding_mask=None, **_unused):
        if (key is not None and key is not query) or (value is not None and value is not query) \
                or key_padding_mask is not None or need_weights:
            raise NotImplementedError("PackedSelfAttention: self-attention without padding masks or weights only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, _ = x.shape
        q, k, v = self.in_proj(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # MultiheadAttention: True = not allowed
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, float("-inf"))
        if attn_mask is not None and attn_mask.dim() == 3:  # (batch * heads, n, n)
            attn_mask = attn_mask.reshape(b, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, -1))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _open_clip_attention(block: nn.Module) -> AttnSite | None:
    """open_clip's ResidualAttentionBlock: its nn.MultiheadAttention (packed in-projection, its output
    projection applied inside torch's functional kernel) is replaced, in place and with the same
    weights, by `PackedSelfAttention`, whose heads can be scored and cut."""
    attn = getattr(block, "attn", None)
    if isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and not hasattr(block, "ln_1_kv") \
            and type(block).__module__.startswith("open_clip") and attn.bias_k is None:
        attn = block.attn = PackedSelfAttention(attn)
    if not isinstance(attn, PackedSelfAttention):
        return None
    return AttnSite("attn", "attn.out_proj", attn.head_dim, qkv="attn.in_proj", count_attrs=("num_heads",))


ATTN_FINDERS = [_timm_attention, _eva_attention, _hf_attention, _open_clip_attention]


def find_attn_sites(blocks: nn.Module) -> list[AttnSite] | None:
    """Each block's attention site, or None when some block's attention is of no kind known here
    (open_clip's attention modules are replaced by equivalent ones on the way: `_open_clip_attention`)."""
    sites = []
    for block in blocks:
        site = next((s for f in ATTN_FINDERS if (s := f(block)) is not None), None)
        if site is None:
            return None
        sites.append(site)
    return sites


@functools.cache
def hf_ragged_self_attn() -> bool:
    """transformers' CLIP and SigLIP attention runs fewer heads than the block width from transformers 5
    on (it reshapes the heads' output to (-1) there; 4.x reshapes to embed_dim: "shape '[2, 17, 64]' is
    invalid for input of size 1088" on 4.46.3)."""
    try:
        import transformers
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) >= 5


def attn_kind_hint(blocks: nn.Module) -> str:
    """What the first block's attention is, for the message that refuses to cut its heads."""
    block = blocks[0]
    for name in ("attn", "attention", "self_attn"):
        if hasattr(block, name):
            if name == "self_attn" and not hf_ragged_self_attn():
                return (f"{type(getattr(block, name)).__name__} at {name}: transformers 4.x reshapes its heads to the "
                        "block width; transformers >= 5 cuts them")
            return f"{type(getattr(block, name)).__name__} at {name}"
    return f"no attention module found in {type(block).__name__}"


# --- weights --------------------------------------------------------------------------------------


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Read a safetensors header (its metadata): catches truncated or corrupt files cheaply."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling anything untrusted: safetensors, or torch.load(weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is refused
        raise UserError(f"{path}: refused: not a plain weights file loadable with weights_only=True "
                        f"({first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return obj


def load_weights(model: nn.Module, path: str | Path) -> None:
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: weights do not fit the model: {detail}") from None


# --- loaders --------------------------------------------------------------------------------------


def unknown_model_error(name: str, known: list[str], what: str) -> UserError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"model.name: unknown {what} model {name!r}{hint}")


def load_timm(name: str, pretrained: bool | str, kwargs: dict[str, Any],
              mlp_sites: dict[str, Any] | None = None) -> Loaded:
    import timm

    if not timm.is_model(name):
        raise unknown_model_error(name, timm.list_models(), "timm")
    with factory_errors("timm", name, pretrained is True, f" hub weights ({_timm_hub_file(name)})"):
        model = timm.create_model(name, pretrained=pretrained is True, **kwargs)
    if isinstance(pretrained, str):
        load_weights(model, pretrained)
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    # The pretrained config keeps the hub resolution even when kwargs change img_size: follow the
    # model's real input, or the transform would resize every image to 224.
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], *img_size)
    transform = timm.data.create_transform(**cfg, is_training=False)
    blocks, sites = find_sites(model, mlp_sites)
    output: Output = "logits" if getattr(model, "num_classes", 0) else "embedding"
    spec = {"source": "timm", "name": name, "kwargs": kwargs, "mlp_sites": mlp_sites}
    return Loaded(model, blocks, sites, output, transform, tuple(cfg["input_size"]), spec)


@contextlib.contextmanager
def factory_errors(library: str, name: str, hub: bool, weights: str = "") -> Iterator[None]:
    """A model factory's failures as one-line UserErrors: an argument it refuses is the recipe's
    model.kwargs; with hub weights asked for, any other failure is model.pretrained (with what was
    looked for and the offline hint). The hub clients' own log lines are silenced meanwhile."""
    logging.disable(logging.ERROR)  # they log retries and failed downloads, then raise: the error says it once
    try:
        yield
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise UserError(f"model.kwargs: {library} refused them for {name!r}: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - hub and factory errors come in many types
        if not hub and not isinstance(e, RuntimeError):
            raise
        if not hub:
            raise UserError(f"model.kwargs: {library} refused them for {name!r}: {first_line(e)}") from None
        raise UserError(f"model.pretrained: {library} could not load {name!r}{weights} ({type(e).__name__}: "
                        f"{first_line(e, 200)}){_offline_hint()}") from None
    finally:
        logging.disable(logging.NOTSET)


def _timm_hub_file(name: str) -> str:
    """Where timm looks for a model's weights in the Hugging Face cache (what a missing entry is)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return f"model.safetensors (or pytorch_model.bin) of {hub}" if hub else "no hub source"


def _offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
        return (f"; HF_HUB_OFFLINE is set and the cache {cache} does not hold them: fetch them once online, or give "
                "model.pretrained a local weights file")
    return "; give model.pretrained a local weights file instead"


def load_open_clip(name: str, pretrained: bool | str, kwargs: dict[str, Any],
                   mlp_sites: dict[str, Any] | None = None) -> Loaded:
    import open_clip

    if name not in open_clip.list_models():
        raise unknown_model_error(name, open_clip.list_models(), "open_clip")
    kwargs = dict(kwargs)
    tag = kwargs.pop("pretrained", None)  # an open_clip tag, e.g. laion2b_s32b_b82k (with pretrained: true)
    if pretrained is True:
        tags = open_clip.list_pretrained_tags_by_model(name)
        tag = tag or (tags[0] if tags else None)
        if tag not in tags:
            raise UserError(f"model.kwargs.pretrained: {name} has no open_clip weights {tag!r}; known: {', '.join(tags)}")
    with factory_errors("open_clip", name, pretrained is True, f" weights {tag}"):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag if pretrained is True else None,
                                                                    **kwargs)
    if isinstance(pretrained, str):
        load_weights(model, pretrained)
    visual = model.visual.eval()
    blocks, sites = find_sites(visual, mlp_sites)
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    spec = {"source": "open_clip", "name": name, "kwargs": kwargs, "mlp_sites": mlp_sites}
    return Loaded(visual, blocks, sites, "embedding", preprocess, (3, *size), spec, _text_encoder(model, name))


def _text_encoder(model: nn.Module, name: str) -> Callable[[list[str]], torch.Tensor]:
    """The CLIP model's own tokenizer and text tower, frozen and left unpruned."""
    import open_clip

    text = copy.copy(model)  # shares the towers; `visual` is the part that gets pruned, the text side stays whole
    length = getattr(model, "context_length", None)
    tokenizer: list = []  # made on first use: some tokenizers come from the hub, and most builds never need one

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        if not tokenizer:
            tokenizer.append(open_clip.get_tokenizer(name))
        tokens = tokenizer[0](prompts, context_length=length) if length else tokenizer[0](prompts)
        return text.encode_text(tokens.to(next(text.parameters()).device)).float()

    return encode


class _HFImageModel(nn.Module):
    """A transformers vision model as a tensor -> tensor module: pixels in, one output field out."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=x), self.field)


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# transformers classes amp-deploy knows: the output it serves, its image processor class and that
# processor's settings where a checkpoint folder brings no preprocessor_config.json (the hub's own)
HF_CLASSES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ViTModel": ("pooler_output", "ViTImageProcessor", {}),
    "ViTForImageClassification": ("logits", "ViTImageProcessor", {}),
    "CLIPVisionModel": ("pooler_output", "CLIPImageProcessor", {}),
    "CLIPVisionModelWithProjection": ("image_embeds", "CLIPImageProcessor", {}),
    # facebook/dinov2-*: resize the short side to 256 (bicubic), crop 224, ImageNet statistics
    "Dinov2Model": ("pooler_output", "BitImageProcessor",
                    {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
                     "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}),
    "SiglipVisionModel": ("pooler_output", "SiglipImageProcessor", {}),
}


class HFTransform:
    """A PIL image -> the pixel tensor the checkpoint's own image processor makes (picklable, so
    DataLoader workers under spawn take it)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _processor(name: str, folder: str | None, overrides: dict[str, Any]) -> Any:
    """The checkpoint folder's preprocessor_config.json, else the class's settings; `overrides`
    (model.kwargs.processor) change single settings, e.g. a smaller crop_size."""
    import transformers

    _, cls_name, defaults = HF_CLASSES[name]
    cls = getattr(transformers, cls_name)
    if not isinstance(overrides, dict):
        raise UserError(f"model.kwargs.processor: expected a mapping of {cls_name} settings, got "
                        f"{type(overrides).__name__}")
    try:
        if folder and (Path(folder) / "preprocessor_config.json").is_file():
            return cls.from_pretrained(folder, local_files_only=True, **overrides)
        return cls(**{**defaults, **overrides})
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"model.kwargs.processor: {cls_name} refused them: {first_line(e)}") from None


def _sized(size: int) -> dict[str, Any]:
    """Processor settings for a model built from a config alone: its image_size in and out."""
    return {"size": {"height": size, "width": size}, "crop_size": {"height": size, "width": size}}


def _processor_size(proc: Any) -> tuple[int, int]:
    """The processor's output size: the crop where it crops, else its resize target."""
    size = proc.crop_size if getattr(proc, "do_center_crop", False) else proc.size
    size = dict(size) if not isinstance(size, dict) else size
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    edge = size.get("shortest_edge")
    if edge:
        return int(edge), int(edge)
    raise UserError(f"model.kwargs.processor: cannot tell the input size from {type(proc).__name__} size {size}")


def load_transformers(name: str, pretrained: bool | str, kwargs: dict[str, Any],
                      mlp_sites: dict[str, Any] | None = None) -> Loaded:
    """A Hugging Face transformers vision tower: `name` is its class (e.g. Dinov2Model); built from
    `kwargs.config` (random init), from the hub checkpoint `kwargs.checkpoint` (pretrained: true), or
    from a local folder (config.json + weights) or weights file (pretrained: PATH). Images go
    through the checkpoint's own image processor (`kwargs.processor` overrides its settings);
    `kwargs.attn_implementation` (eager, sdpa) is kept when the pruned model is rebuilt."""
    try:
        import transformers
    except ImportError:
        raise UserError("model.source: transformers needs the optional extra: pip install 'amp-deploy[transformers]'"
                        ) from None
    if name not in HF_CLASSES:
        raise unknown_model_error(name, list(HF_CLASSES), "transformers")
    unknown = set(kwargs) - {"config", "checkpoint", "processor", "attn_implementation"}
    if unknown:
        raise UserError(f"model.kwargs: unknown for transformers: {', '.join(sorted(unknown))} (known: config, "
                        "checkpoint, processor, attn_implementation)")
    cls = getattr(transformers, name)
    field = HF_CLASSES[name][0]
    model = _hf_model(cls, pretrained, kwargs).eval()
    folder = pretrained if isinstance(pretrained, str) and Path(pretrained).is_dir() else None
    source = folder or (kwargs.get("checkpoint") if pretrained is True else None)
    overrides = kwargs.get("processor") or {}
    if source is None and not overrides and not HF_CLASSES[name][2]:
        # built from a config alone, a model with fixed position embeddings (ViT, CLIP, SigLIP) takes
        # its config's image_size; DINOv2 interpolates them and keeps its processor's 224 crop
        overrides = _sized(int(getattr(model.config, "image_size", 224)))
    proc = _processor(name, source, overrides)
    size = _processor_size(proc)
    wrapped = _HFImageModel(model, field)
    blocks, sites = find_sites(wrapped, mlp_sites)
    output: Output = "logits" if field == "logits" else "embedding"
    # the resolved config and processor rebuild the architecture and its inputs with no hub access
    # (a pruned checkpoint needs that), in the attention kernel the original ran
    spec_kwargs = {"config": model.config.to_dict(), "processor": proc.to_dict(),
                   "attn_implementation": model.config._attn_implementation}
    spec = {"source": "transformers", "name": name, "kwargs": spec_kwargs, "mlp_sites": mlp_sites}
    return Loaded(wrapped, blocks, sites, output, HFTransform(proc), (3, *size), spec)


def _hf_config(cls, kwargs: dict[str, Any]):
    config = kwargs.get("config") or {}
    if not isinstance(config, dict):
        raise UserError(f"model.kwargs.config: expected a mapping of {cls.config_class.__name__} settings, got "
                        f"{type(config).__name__}")
    config = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        cfg = cls.config_class(**config)
    except (TypeError, ValueError) as e:
        raise UserError(f"model.kwargs.config: {cls.config_class.__name__} refused it: {first_line(e)}") from None
    for key in ("patch_size", "image_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(cfg, key, None)
        if isinstance(value, (int, float)) and value <= 0:
            raise UserError(f"model.kwargs.config.{key}: must be positive, got {value}")
    return cfg


def _hf_model(cls, pretrained: bool | str, kwargs: dict[str, Any]) -> nn.Module:
    attn = kwargs.get("attn_implementation")
    if attn is not None and attn not in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
        raise UserError(f"model.kwargs.attn_implementation: expected eager or sdpa, got {attn!r}")
    extra = {"attn_implementation": attn} if attn else {}
    if pretrained is True and not kwargs.get("checkpoint"):
        raise UserError("model.kwargs.checkpoint: name the hub checkpoint (e.g. facebook/dinov2-base)")
    if pretrained is True or (isinstance(pretrained, str) and Path(pretrained).is_dir()):
        return _hf_from_files(cls, pretrained, kwargs, extra)
    cfg = _hf_config(cls, kwargs)
    with factory_errors("transformers", cls.__name__, False):
        try:
            model = cls._from_config(cfg, **extra)
        except ZeroDivisionError as e:
            raise UserError(f"model.kwargs.config: {cls.config_class.__name__} does not build: {first_line(e)}") from None
    if isinstance(pretrained, str):
        load_weights(model, pretrained)
    return model


def _hf_from_files(cls, pretrained: bool | str, kwargs: dict[str, Any], extra: dict[str, Any]) -> nn.Module:
    """from_pretrained (hub cache, or a local folder), refusing weights that do not match the model."""
    source = kwargs["checkpoint"] if pretrained is True else str(pretrained)
    overrides = kwargs.get("config") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"model.kwargs.config: expected a mapping, got {type(overrides).__name__}")
    local = pretrained is not True
    if local and not (Path(source) / "config.json").is_file():
        raise UserError(f"model.pretrained: {source} has no config.json (a transformers checkpoint folder: "
                        "config.json and model.safetensors)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: the build's own progress says what runs
    try:
        with factory_errors("transformers", cls.__name__, not local, f" from {source}"):
            model, info = cls.from_pretrained(source, local_files_only=local, output_loading_info=True,
                                              **extra, **overrides)
    except UserError as e:
        if not local:
            raise
        raise UserError(f"model.pretrained: {source}: {str(e).split(': ', 1)[-1]}") from None
    except Exception as e:  # noqa: BLE001 - wrong shapes, unreadable files: one line naming the folder
        raise UserError(f"model.pretrained: {source}: weights do not fit {cls.__name__} built from its config "
                        f"({type(e).__name__}: {first_line(e, 200)})") from None
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}{' ...' if len(v) > 4 else ''}"
                           for k, v in bad.items() if v)
        raise UserError(f"model.pretrained: {source}: the weights do not match {cls.__name__} ({detail})")
    return model


LOADERS: dict[str, Callable[..., Loaded]] = {
    "timm": load_timm,
    "open_clip": load_open_clip,
    "transformers": load_transformers,
}


def load_model(source: FactorySource, name: str, pretrained: bool | str, kwargs: dict[str, Any],
               mlp_sites: dict[str, Any] | None = None) -> Loaded:
    """Build a model from its factory (plain arguments, no recipe object).

    Args:
        source: the factory, a key of `LOADERS`.
        name: the factory's model name.
        pretrained: True for the factory's own weights, False for a seeded random init, or the path
            of a local weights file (safetensors, or a state dict loaded with weights_only).
        kwargs: passed to the factory (depth, img_size, num_classes, ...).
        mlp_sites: where the MLPs are, for a model family not found automatically.
    """
    return LOADERS[source](name, pretrained, dict(kwargs), mlp_sites)


# --- random-init models for checks ---------------------------------------------------------------

LAYER_SCALE_NAMES = ("gamma", "lambda1", "scale")  # timm LayerScale.gamma, transformers Dinov2LayerScale.lambda1
EVA_GAMMAS = ("gamma_1", "gamma_2")  # timm EvaBlock's layer scales (EVA02, DINOv3), plain block parameters


def spread_init(model: nn.Module) -> nn.Module:
    """A random-init model whose features differ between images, so that pruning checks mean something.

    DINOv2-style factories initialise LayerScale to 1e-5: every block adds almost nothing, embeddings
    of different images have cosine ~1, the entropy is log(batch) and every score ~0; and ViT
    factories draw Linear weights with std 0.02, so MLP branches barely move the residual stream.
    Layer scales are set to 1, Linear layers get PyTorch's default (fan-in scaled) initialisation
    so that every branch counts, and norms get non-trivial affine weights.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            layer_scale = "scale" in type(module).__name__.lower() or "ls" in name.rsplit(".", 1)[-1]
            for pname, p in module.named_parameters(recurse=False):
                if pname in EVA_GAMMAS or (layer_scale and pname in LAYER_SCALE_NAMES):
                    p.fill_(1.0)
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1)
    return model


def site_dicts(sites: list[MlpSite]) -> list[dict[str, Any]]:
    return [asdict(s) for s in sites]


def count_params(model: nn.Module) -> int:
    """Parameters of a module (the budget search and the report count the same way)."""
    return sum(p.numel() for p in model.parameters())
