"""Compensation: re-fit the layer that reads the cut units (not in AMP; ../shared/AMP.md section 6).

When a block's MLP loses hidden neurons (or its attention loses heads), the layer that reads them
(fc2 or its family's equivalent; the attention's output projection) keeps weights fitted to the full
set. Here it is re-fitted, in closed form, to what the unpruned layer produced on calibration tokens:

    [W' | b'] = argmin  sum_t |y_t - W' x_S,t - b'|^2  +  lam |[W' | b'] - [W_S | b]|^2
              = (C + lam [W_S | b]) (G_SS + lam I)^-1

with y = W x + b the unpruned layer's output, x_S the kept units' values, G = sum [x; 1][x; 1]^T over
calibration tokens and C = [W | b] G[:, S+1]. The damping pulls toward the weights as cut (not toward
zero): with nothing cut the re-fit returns the layer unchanged, and a direction the calibration tokens
never excite keeps its pretrained weight. `lam = damping * mean(diag(G_SS))`, so `damping` has no
unit and means the same for every model.

A site whose kept units' values do not change with the cut (plain GELU MLPs, GLU/SwiGLU, packed
projections, every attention without a norm over its heads' channels) needs one Gram matrix per
block, accumulated over calibration tokens: every candidate width or head count is then a solve, not
a pass over data. A site with a norm over the cut units (EVA02's SwiGLU norm, open_clip's scale_fc,
timm's attention scale norm) changes the kept units' values when units go, so its re-fit reads what
the cut layer actually reads: a sample of the norm's input tokens is kept, and the cut norm is
applied to it for each candidate.

`bias` mode (FLAP's compensation) folds the removed units' calibration mean into the bias and
leaves the weights as they are. A guard compares each re-fit with the layer as cut on tokens the fit
never saw (the validation images'): where the re-fit reconstructs the unpruned output worse, it is
declined and the layer stays as cut.

Everything here is arithmetic on tensors and modules handed in: no recipe, no file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

Mode = Literal["none", "bias", "ridge"]
DEFAULT_DAMPING = 0.01
DEFAULT_TOKENS = 64  # tokens sampled per image for the statistics (a ViT at 224x224 has 197-257)
MAX_SAMPLES = 8192  # tokens kept per norm site (those keep samples, not a Gram matrix)


@dataclass
class Stats:
    """One layer's input over calibration tokens: a Gram matrix [x; 1][x; 1]^T summed over tokens
    (float64, n + 1 square), or for a site with a norm over the cut units a sample of the norm's
    input (tokens x n)."""

    gram: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0

    def add(self, x: torch.Tensor, sample: bool) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if sample:
            room = MAX_SAMPLES - self.tokens
            if room > 0:
                self.samples.append(x[:room].cpu())
                self.tokens += min(room, len(x))
            return
        ones = torch.ones(len(x), 1, dtype=x.dtype, device=x.device)
        xa = torch.cat([x, ones], 1)
        g = (xa.T @ xa).double().cpu()
        self.gram = g if self.gram is None else self.gram + g
        self.tokens += len(x)

    def sample(self) -> torch.Tensor:
        """The sampled tokens as one tensor (joined once: every candidate of the search reads it)."""
        if len(self.samples) > 1:
            self.samples = [torch.cat(self.samples)]
        return self.samples[0] if self.samples else torch.zeros(0)


@dataclass
class BlockStats:
    mlp: Stats
    attn: Stats | None  # None: heads not cut, or an attention whose heads' input cannot be read


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().double()
    return torch.cat([w, bias.detach().double()[:, None]], 1) if bias is not None else w


def _columns(keep: torch.Tensor, n: int, bias: bool) -> torch.Tensor:
    """The Gram's rows/columns of the kept units, and the bias's (the last) where the layer has one."""
    keep = keep.to("cpu", torch.long)
    return torch.cat([keep, torch.tensor([n])]) if bias else keep


def _solve(gram_ss: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, damping: float, n_units: int) -> torch.Tensor:
    """(cross + lam prior) (gram_ss + lam I)^-1, lam = damping * the mean of the units' diagonal."""
    diag = torch.diagonal(gram_ss)[:n_units]
    lam = damping * float(diag.mean()) if n_units else 0.0
    lam = max(lam, 1e-12 * float(torch.diagonal(gram_ss).abs().max()) + 1e-30)
    a = gram_ss + lam * torch.eye(len(gram_ss), dtype=gram_ss.dtype)
    rhs = (cross + lam * prior).T
    try:
        chol = torch.linalg.cholesky(a)
        return torch.cholesky_solve(rhs, chol).T
    except RuntimeError:  # not positive definite in float64 (a degenerate sample): least squares
        return torch.linalg.lstsq(a, rhs).solution.T


def refit_gram(weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, gram: torch.Tensor,
               damping: float = DEFAULT_DAMPING, mode: Mode = "ridge") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept columns of `weight` (out x n) and the bias, re-fitted from the unpruned layer's input
    Gram matrix (`Stats.gram`, n + 1 square). Returns (weight out x len(keep), bias) in weight's dtype."""
    n = weight.shape[1]
    full = _augmented(weight, bias)
    cols = _columns(keep, n, bias is not None)
    keep_cpu = keep.to("cpu", torch.long)
    if mode == "bias":
        if bias is None:
            return weight[:, keep_cpu.to(weight.device)].clone(), None
        removed = torch.ones(n, dtype=torch.bool)
        removed[keep_cpu] = False
        mean = gram[n, :n] / gram[n, n]  # each unit's calibration mean
        b = bias.detach().double().cpu() + weight.detach().double().cpu()[:, removed] @ mean[removed]
        return weight[:, keep_cpu.to(weight.device)].clone(), b.to(bias.dtype).to(bias.device)
    rows = gram if bias is not None else gram[:n, :n]
    full_cpu = full.cpu()
    cross = full_cpu @ rows[:, cols]
    new = _solve(gram[cols][:, cols], cross, full_cpu[:, cols], damping, len(keep_cpu))
    return _split(new, weight, bias, len(keep_cpu))


def _split(new: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int):
    w = new[:, :k].to(dtype=weight.dtype, device=weight.device).contiguous()
    b = new[:, k].to(dtype=bias.dtype, device=bias.device).contiguous() if bias is not None else None
    return w, b


def gram_error(weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, new_weight: torch.Tensor,
               new_bias: torch.Tensor | None, gram: torch.Tensor) -> float:
    """Mean squared error per token (summed over outputs) of the cut layer [new_weight | new_bias] on
    units `keep` against the unpruned layer, over the tokens whose Gram matrix is `gram`."""
    n = weight.shape[1]
    full = _augmented(weight, bias).cpu()
    diff = full.clone()
    cols = _columns(keep, n, bias is not None)
    diff[:, cols] -= _augmented(new_weight, new_bias).cpu()
    rows = gram if bias is not None else gram[:n, :n]
    return float(((diff @ rows) * diff).sum() / gram[n, n])


def refit_samples(weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, z: torch.Tensor,
                  norm: nn.Module, cut_norm: nn.Module, damping: float = DEFAULT_DAMPING, mode: Mode = "ridge"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The re-fit where a norm over the units sits before the layer: `z` (tokens x n) is the norm's
    input; the unpruned layer read norm(z), the cut one reads cut_norm(z[:, keep])."""
    x, xc = _normed(z, keep, norm, cut_norm)
    kept = weight[:, keep.to(weight.device)].clone()
    if mode == "bias":  # the cut layer's mean output made the unpruned one's
        if bias is None:
            return kept, None
        w = weight.detach().double().cpu()
        b = bias.detach().double().cpu() + x.mean(0) @ w.T - xc.mean(0) @ w[:, keep.cpu()].T
        return kept, b.to(dtype=bias.dtype, device=bias.device)
    full = _augmented(weight, bias).cpu()
    xca = torch.cat([xc, torch.ones(len(xc), 1, dtype=xc.dtype)], 1)
    cols = _columns(keep, weight.shape[1], bias is not None)
    if bias is None:
        xca = xca[:, :-1]
    target = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias is not None else x
    cross = (full @ target.T) @ xca
    new = _solve(xca.T @ xca, cross, full[:, cols], damping, len(keep))
    return _split(new, weight, bias, len(keep))


def samples_error(weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, new_weight: torch.Tensor,
                  new_bias: torch.Tensor | None, z: torch.Tensor, norm: nn.Module, cut_norm: nn.Module) -> float:
    """Mean squared error per token of the cut layer (reading cut_norm(z[:, keep])) against the
    unpruned one (reading norm(z)) over the tokens `z`."""
    x, xc = _normed(z, keep, norm, cut_norm)
    y = x @ weight.detach().double().cpu().T + (bias.detach().double().cpu() if bias is not None else 0)
    yc = xc @ new_weight.detach().double().cpu().T + (new_bias.detach().double().cpu() if new_bias is not None else 0)
    return float((y - yc).pow(2).sum(1).mean())


@torch.no_grad()
def _normed(z: torch.Tensor, keep: torch.Tensor, norm: nn.Module, cut_norm: nn.Module):
    dev = next(iter(norm.parameters()), torch.zeros(0)).device
    zd = z.to(dev, next(iter(norm.parameters()), torch.zeros(0, dtype=torch.float32)).dtype)
    x = norm(zd).double().cpu()
    xc = cut_norm(zd[:, keep.to(dev)]).double().cpu()
    return x, xc


@dataclass
class Decision:
    """What became of one re-fit: its error and the as-cut error on held-out tokens, and whether it was kept."""

    error_cut: float
    error_refit: float
    declined: bool


class Compensator:
    """Re-fits a block's cut layer from calibration statistics (`collect`), guarded by held-out ones.

    `fit[i]` and `check[i]` are block i's statistics on the calibration and the validation images;
    `decisions[(i, "mlp" | "attn")]` holds the last re-fit's `Decision` of each block and site.
    """

    def __init__(self, fit: list[BlockStats], check: list[BlockStats] | None, mode: Mode = "ridge",
                 damping: float = DEFAULT_DAMPING) -> None:
        self.fit, self.check, self.mode, self.damping = fit, check, mode, damping
        self.decisions: dict[tuple[int, str], Decision] = {}
        self.seconds = 0.0  # spent in re-fits and their guard
        self.statistics_seconds = 0.0  # spent gathering `fit` and `check` (set by the caller)

    def mlp(self, i: int, original: dict[str, nn.Module], keep: torch.Tensor, cut: dict[str, nn.Module]
            ) -> dict[str, nn.Module]:
        """`cut` (block i's sliced MLP modules) with fc_out re-fitted; the originals are left alone."""
        return self._refit(i, "mlp", original["fc_out"], keep, cut, "fc_out", original.get("norm"), cut.get("norm"))

    def attn(self, i: int, original: dict[str, nn.Module], channels: torch.Tensor, cut: dict[str, nn.Module]
             ) -> dict[str, nn.Module]:
        """`cut` (block i's sliced attention) with its output projection re-fitted over the kept heads'
        `channels`."""
        if self.fit[i].attn is None:
            return cut
        return self._refit(i, "attn", original["proj"], channels, cut, "proj", original.get("norm"), cut.get("norm"))

    def _refit(self, i: int, kind: str, layer: nn.Linear, keep: torch.Tensor, cut: dict, key: str,
               norm: nn.Module | None, cut_norm: nn.Module | None) -> dict:
        import time

        if self.mode == "none" or len(keep) == layer.in_features:
            return cut
        start = time.perf_counter()
        stats = getattr(self.fit[i], kind)
        held = getattr(self.check[i], kind) if self.check is not None else None
        keep = keep.to("cpu", torch.long)
        if norm is not None:
            z = stats.sample()
            w, b = refit_samples(layer.weight, layer.bias, keep, z, norm, cut_norm, self.damping, self.mode)
            errors = (lambda nw, nb: samples_error(layer.weight, layer.bias, keep, nw, nb, held.sample(), norm, cut_norm)) \
                if held is not None and held.tokens else None
        else:
            w, b = refit_gram(layer.weight, layer.bias, keep, stats.gram, self.damping, self.mode)
            errors = (lambda nw, nb: gram_error(layer.weight, layer.bias, keep, nw, nb, held.gram)) \
                if held is not None and held.gram is not None else None
        declined = False
        if errors is not None:
            as_cut = cut[key]
            e_cut, e_fit = errors(as_cut.weight, as_cut.bias), errors(w, b)
            declined = not e_fit <= e_cut
            self.decisions[(i, kind)] = Decision(e_cut, e_fit, declined)
        self.seconds += time.perf_counter() - start
        if declined:
            return cut
        new = nn.Linear(len(keep), layer.out_features, bias=layer.bias is not None, device=layer.weight.device,
                        dtype=layer.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b)
        return {**cut, key: new}

    def summary(self) -> list[dict]:
        """The decisions, one row per block and site (the rebuild's report)."""
        return [{"block": i, "site": kind, "error_cut": round(d.error_cut, 6), "error_refit": round(d.error_refit, 6),
                 "declined": d.declined} for (i, kind), d in sorted(self.decisions.items())]


def attn_readable(site) -> bool:
    """An attention whose output projection's input can be re-fitted: no gate multiplies the heads'
    channels after a norm over them (that product is not read back from one hooked tensor)."""
    return not (site.norm and site.gate)


@torch.no_grad()
def collect(loaded, batches: Iterable[torch.Tensor], device: torch.device, heads: bool,
            tokens_per_image: int = DEFAULT_TOKENS, seed: int = 0) -> list[BlockStats]:
    """Run the unpruned model over `batches` (image tensors) and gather, per block, the statistics of
    the MLP's output layer input (and, with `heads`, the attention output projection's): a Gram
    matrix, or for a site with a norm over the cut units a sample of that norm's input. At most
    `tokens_per_image` tokens of each image (a seeded sample) are counted."""
    blocks = loaded.block_list()
    depth = len(loaded.sites)
    out = [BlockStats(Stats(), Stats() if heads and loaded.attn is not None and attn_readable(loaded.attn[i]) else None)
           for i in range(depth)]
    gen = torch.Generator().manual_seed(seed)
    state = {"images": 1}

    def hook(stats: Stats, sample: bool):
        def fn(_module, args):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            k = min(len(x), tokens_per_image * state["images"])
            if k < len(x):
                x = x[torch.randperm(len(x), generator=gen)[:k].to(x.device)]
            stats.add(x, sample)
        return fn

    handles = []
    for i in range(depth):
        block, site = blocks[i], loaded.sites[i]
        handles.append(block.get_submodule(site.norm or site.fc_out).register_forward_pre_hook(
            hook(out[i].mlp, bool(site.norm))))
        if out[i].attn is not None:
            a = loaded.attn[i]
            handles.append(block.get_submodule(a.norm or a.proj).register_forward_pre_hook(
                hook(out[i].attn, bool(a.norm))))
    try:
        for x in batches:
            state["images"] = len(x)
            loaded.model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return out
