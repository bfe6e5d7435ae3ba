"""Widths for a latency budget (`prune.target_speedup`): measured latency table, loss curves, knapsack.

1. Candidate widths: `count` widths per block, evenly spaced up to the full width and rounded to
   the `align` grid (the full width is always one).
2. Latency table: the model with EVERY block at candidate width w is run on the target runtime,
   interleaved round by round with the full model, so that drift hits both alike; each
   candidate's latency is the median over rounds of its ratio to the full model in the same round.
   Blocks of a ViT share one shape, so one block moving from the full width to w saves
   (1 - ratio(w)) / depth of the full model's latency. The ratios are made monotone in w (pool
   adjacent violators) and at most 1 before use: a narrower MLP is never slower, and what remains
   is noise.
3. Loss curves: for each block alone (the others whole), the search loss at every candidate width,
   with the search's own cached evaluator (hidden states entering the block are replayed).
4. Choice: the widths with the least summed loss increase whose predicted saving reaches the
   budget, an exact multiple-choice knapsack over savings discretised to 1/4000 of the latency
   (rounded down, so the predicted saving of the choice is never below the budget).
The caller measures the chosen model end to end and, when it misses, asks again with a corrected
budget (`corrected_aim`: scaled by the miss, or interpolated once checks lie on both sides).

With attention heads (`prune.heads`) the table gains a second axis (the model with every block at h
heads, timed the same way) and each block a second curve (its loss at h heads, the rest whole); a
block's option is a (width, heads) pair whose saving and loss increase are the sums of the two
axes' (the MLP and the attention run one after the other), and the knapsack chooses one pair per
block. The heads axis is timed with every MLP at its `head_base` width (the candidate below whole),
and a head count's saving is taken from that model, not from the full one: on ONNX Runtime CPU the
first cut of either axis saved 15-25% of the latency whatever its size (DINOv2 ViT-S/14, 56x56,
batch 8: 1408 of 1536 neurons 0.74-0.91 of the full model's latency, 5 of 6 heads 0.77-0.88), and
timed from the full model each axis counted that step: the joint model's prediction erred more the
more heads were cut (measured / predicted 0.73, 0.54, 0.43, 0.41 over four checks for 2.0x, never
within 3%). Timed from a cut MLP the step is counted once; the sum still over-predicts (the two axes'
savings do not add up on this runtime at this size: measured / predicted 0.69 and 0.69), but by a
steady factor, which the caller's correction (scaled by the miss) removes: 2.01x at the second check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from amp_deploy.data import Split
from amp_deploy.numerics import fp32_reference, median_ratio
from amp_deploy.prune.compensate import Compensator
from amp_deploy.prune.families import Loaded
from amp_deploy.prune.rebuild import cut_attention, cut_mlp, keep_top, set_attention, set_modules
from amp_deploy.prune.search import _Evaluator, width_grid
from amp_deploy.prune.shape import BlockShape, HasShapes

UNITS = 4000  # knapsack resolution: savings in 1/UNITS of the full model's latency


def candidate_widths(h: int, count: int, align: int) -> list[int]:
    """`count` widths from h/count to h, each the nearest width on the `align` grid (no repeats)."""
    grid = width_grid(h, align)
    out = sorted({min(grid, key=lambda w: (abs(w - h * k / count), -w)) for k in range(1, count + 1)})
    return out if out[-1] == h else [*out, h]


def monotone(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence nearest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1), (m2, w2) = blocks[-2], blocks[-1]
            blocks[-2:] = [[(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2]]
    return [m for m, w in blocks for _ in range(int(w))]


def candidate_heads(h: int, count: int) -> list[int]:
    """Head counts for a block of h heads: every count from 1 to h, or `count` of them evenly spaced
    when h is larger (h itself always one)."""
    return candidate_widths(h, min(count, h), 1)


@dataclass
class Axis:
    """One axis of the latency table: the model with every block at each candidate size (MLP width
    or head count), relative to the full model."""

    sizes: list[int]  # candidate sizes, ascending; the last is the full size
    ratio: list[float]  # median over rounds of latency(all blocks at s) / latency(full), as measured
    fitted: list[float]  # the same, made non-decreasing in s and at most 1
    p50_ms: list[float]  # each candidate's median latency

    def ratio_at(self, s: int) -> float:
        return float(np.interp(s, self.sizes, self.fitted))


def _axis(sizes: list[int], samples: dict[int, list[float]], full_samples: dict[int, list[float]],
          full_ms: float, top: float = 1.0, top_ms: float | None = None) -> Axis:
    """`top`: the ratio of the axis's whole size (1, the full model; for heads timed at a cut MLP width,
    that model's ratio, measured on the widths axis)."""
    ratio = [median_ratio(samples[s], full_samples[s]) for s in sizes[:-1]] + [top]
    fitted = [min(top, r) for r in monotone(ratio[:-1])] + [top]  # the whole size saves nothing, by definition
    return Axis(sizes=sizes, ratio=ratio, fitted=fitted,
                p50_ms=[float(np.median(samples[s])) for s in sizes[:-1]] + [full_ms if top_ms is None else top_ms])


@dataclass
class LatencyTable:
    """Latency of the model with every block at each candidate width (and, with a heads axis, at
    each candidate head count), relative to the full model."""

    widths: list[int]  # candidate widths, ascending; the last is the full width
    ratio: list[float]  # median over rounds of latency(all blocks at w) / latency(full), as measured
    fitted: list[float]  # the same, made non-decreasing in w
    full_ms: float  # the full model's median latency
    p50_ms: list[float]  # each candidate's median latency
    rounds: int
    depth: int
    heads: Axis | None = None  # the heads axis (prune.heads), every MLP at head_base
    head_base: int | None = None  # the MLP width the heads axis was timed at (None: whole)

    def saving(self, w: int) -> float:
        """Fraction of the full model's latency saved by ONE block at width w (linear between candidates)."""
        r = float(np.interp(w, self.widths, self.fitted))
        return (1.0 - r) / self.depth

    def head_saving(self, h: int) -> float:
        """Fraction of the full model's latency saved by ONE block at h heads (0 without a heads axis)."""
        if self.heads is None:
            return 0.0
        top = self.heads.fitted[-1]  # the model the heads axis was timed from (every head kept)
        return max(0.0, top - self.heads.ratio_at(h)) / self.depth

    def to_dict(self) -> dict:
        out = {"widths": self.widths, "ratio": [round(r, 5) for r in self.ratio],
               "fitted": [round(r, 5) for r in self.fitted], "full_ms": round(self.full_ms, 4),
               "p50_ms": [round(v, 4) for v in self.p50_ms], "rounds": self.rounds, "depth": self.depth,
               "block_saving": [round(self.saving(w), 6) for w in self.widths]}
        if self.heads is not None:
            a = self.heads
            out["heads"] = {"heads": a.sizes, "ratio": [round(r, 5) for r in a.ratio],
                            "fitted": [round(r, 5) for r in a.fitted], "p50_ms": [round(v, 4) for v in a.p50_ms],
                            "block_saving": [round(self.head_saving(h), 6) for h in a.sizes],
                            "mlp_width": self.head_base or self.widths[-1]}
        return out


def latency_table(widths: list[int], depth: int, samples: dict[int, list[float]],
                  full_samples: dict[int, list[float]], heads: list[int] | None = None,
                  head_samples: dict[int, list[float]] | None = None,
                  head_full_samples: dict[int, list[float]] | None = None,
                  head_base: int | None = None) -> LatencyTable:
    """The table from each narrower candidate's samples (ms) and the full model's samples of the same
    rounds (each candidate was timed interleaved with the full model), keyed by width; with `heads`,
    the heads axis from the samples of each smaller head count, keyed by heads, likewise, timed with
    every MLP at `head_base` (a candidate width; None: whole)."""
    fulls = [*full_samples.values(), *(head_full_samples or {}).values()]
    everything = np.concatenate([np.asarray(v) for v in fulls])
    full_ms = float(np.median(everything))
    w = _axis(widths, samples, full_samples, full_ms)
    h = None
    if heads is not None:
        base = widths.index(head_base) if head_base is not None else len(widths) - 1
        h = _axis(heads, head_samples, head_full_samples, full_ms, top=w.fitted[base], top_ms=w.p50_ms[base])
    return LatencyTable(widths=widths, ratio=w.ratio, fitted=w.fitted, full_ms=full_ms, p50_ms=w.p50_ms,
                        rounds=len(everything) // max(1, len(fulls)), depth=depth, heads=h,
                        head_base=head_base if heads is not None else None)


@dataclass
class Curves:
    """Per block, the search loss with that block alone at each candidate width (the others whole)."""

    widths: list[list[int]]
    losses: list[list[float]]
    base_loss: float
    block_forwards: int = 0
    heads: list[list[int]] | None = None  # per block, candidate head counts (prune.heads)
    head_losses: list[list[float]] | None = None  # per block, the loss at each head count, its MLP whole

    def increase(self, i: int) -> list[float]:
        """Block i's loss increase over the unpruned model at each candidate (a fall counts as none)."""
        return [max(0.0, v - self.base_loss) for v in self.losses[i]]

    def head_increase(self, i: int) -> list[float]:
        return [max(0.0, v - self.base_loss) for v in self.head_losses[i]]

    def to_dict(self) -> dict:
        out = {"widths": self.widths, "losses": [[round(v, 7) for v in row] for row in self.losses],
               "base_loss": self.base_loss, "block_forwards": self.block_forwards}
        if self.heads is not None:
            out.update(heads=self.heads, head_losses=[[round(v, 7) for v in row] for row in self.head_losses])
        return out


def loss_curves(loaded: Loaded, scores: list[torch.Tensor], val: Split, candidates: list[list[int]], *,
                loss: Callable, batch_size: int = 64, device: torch.device | None = None, cached: bool = True,
                on_block: Callable[[int], None] | None = None, head_scores: list[torch.Tensor] | None = None,
                head_candidates: list[list[int]] | None = None, comp: Compensator | None = None) -> Curves:
    """Each block's search loss at each of its candidate widths, the other blocks whole (and, with
    `head_scores`, at each of its candidate head counts, its MLP and the other blocks whole).

    Blocks are visited first to last; with the cache, the hidden states entering block i come from
    the first pass (the blocks before it are whole), so each evaluation runs blocks i..end only.
    `comp` re-fits each candidate's output layer (prune.compensate): the curves price what will ship.
    `loaded` is left unpruned.
    """
    with fp32_reference():
        ev = _Evaluator(loaded, val, batch_size, loss, device or torch.device("cpu"), cached)
        base = ev.first_pass()
        losses, head_losses = [], [] if head_scores is not None else None
        for i in range(ev.depth):
            original = loaded.mlp_modules(i)
            row = []
            for w in candidates[i]:
                if w == original["fc_out"].in_features:
                    row.append(base)
                    continue
                set_modules(loaded, i, cut_mlp(loaded, i, original, keep_top(scores[i], w), comp))
                row.append(ev(i))
            set_modules(loaded, i, original)
            losses.append(row)
            if head_scores is not None:
                attn, site, row = loaded.attn_modules(i), loaded.attn[i], []
                for h in head_candidates[i]:
                    if h * site.head_dim == attn["proj"].in_features:
                        row.append(base)
                        continue
                    set_attention(loaded, i, cut_attention(loaded, i, attn, keep_top(head_scores[i], h), comp))
                    row.append(ev(i))
                set_attention(loaded, i, attn)
                head_losses.append(row)
            ev.release(i)
            if on_block:
                on_block(i)
        return Curves(widths=[list(c) for c in candidates], losses=losses, base_loss=base,
                      block_forwards=ev.block_forwards,
                      heads=[list(c) for c in head_candidates] if head_scores is not None else None,
                      head_losses=head_losses)


@dataclass
class Choice(HasShapes):
    shapes: list[BlockShape]  # per block, the width and (with a heads axis) the head count
    predicted_ratio: float  # predicted latency / full model's
    loss_increase: float  # summed over blocks (the additive model the knapsack minimises)
    per_block: list[dict] = field(default_factory=list)

    @property
    def predicted_speedup(self) -> float:
        return 1.0 / self.predicted_ratio


def _units(table: LatencyTable, w: int) -> int:
    """One block's saving at width w in knapsack units (rounded down)."""
    return max(0, int(np.floor(table.saving(w) * UNITS + 1e-9)))


def _head_units(table: LatencyTable, h: int) -> int:
    return max(0, int(np.floor(table.head_saving(h) * UNITS + 1e-9)))


def _options(table: LatencyTable, curves: Curves, i: int) -> list[tuple[int, float, int, int | None]]:
    """Block i's choices as (saving units, loss increase, width, heads): each candidate width, or with
    a heads axis each (width, heads) pair, its saving and loss the sums of the two axes'."""
    ws = [(_units(table, w), v, w) for w, v in zip(curves.widths[i], curves.increase(i))]
    if curves.heads is None or table.heads is None:
        return [(u, v, w, None) for u, v, w in ws]
    hs = [(_head_units(table, h), v, h) for h, v in zip(curves.heads[i], curves.head_increase(i))]
    return [(uw + uh, vw + vh, w, h) for uw, vw, w in ws for uh, vh, h in hs]


def max_speedup(table: LatencyTable, curves: Curves) -> float:
    """The largest speedup the knapsack can promise: every block at its smallest candidate (width and,
    with a heads axis, head count), savings counted as the knapsack counts them (so any speedup up to
    it has a choice)."""
    return 1.0 / (1.0 - sum(max(o[0] for o in _options(table, curves, i)) for i in range(len(curves.widths))) / UNITS)


def choose_widths(table: LatencyTable, curves: Curves, speedup: float) -> Choice:
    """The least summed loss increase whose predicted speedup is at least `speedup` (exact
    multiple-choice knapsack on savings in 1/UNITS of the latency; ValueError when out of reach)."""
    need = max(0, int(np.ceil((1.0 - 1.0 / speedup) * UNITS - 1e-9)))  # at most 1x asked: the full widths do
    depth = len(curves.widths)
    inf = float("inf")
    best = np.full(need + 1, inf)
    best[0] = 0.0
    picks = []
    options = [_options(table, curves, i) for i in range(depth)]
    for i in range(depth):
        units, cost = [o[0] for o in options[i]], [o[1] for o in options[i]]
        new = np.full(need + 1, inf)
        pick = np.full(need + 1, -1, dtype=np.int64)
        came = np.full(need + 1, -1, dtype=np.int64)
        for c, (u, v) in enumerate(zip(units, cost)):
            u = min(u, need)
            cand, src = np.full(need + 1, inf), np.arange(need + 1)
            cand[u:need], src[u:need] = best[:need - u] + v, np.arange(need - u)  # j -> j + u, below the budget
            lo = need - u  # every state from lo up reaches the budget
            k = lo + int(np.argmin(best[lo:]))
            cand[need], src[need] = best[k] + v, k
            better = cand < new
            new[better], pick[better], came[better] = cand[better], c, src[better]
        best = new
        picks.append((pick, came))
    if not np.isfinite(best[need]):
        raise ValueError(f"a speedup of {speedup:g} is out of reach: the smallest widths give {max_speedup(table, curves):.3g}x")
    chosen, state = [0] * depth, need
    for i in reversed(range(depth)):
        pick, came = picks[i]
        chosen[i] = int(pick[state])
        state = int(came[state])
    picked = [options[i][c] for i, c in enumerate(chosen)]
    shapes = [BlockShape(o[2], o[3]) for o in picked]
    savings = [table.saving(s.width) + (table.head_saving(s.heads) if s.heads is not None else 0.0) for s in shapes]
    per_block = [{"block": i, "width": s.width, **({"heads": s.heads} if s.heads is not None else {}),
                  "saving": round(sv, 6), "loss_increase": o[1]} for i, (s, o, sv) in enumerate(zip(shapes, picked, savings))]
    return Choice(shapes=shapes, predicted_ratio=1.0 - sum(savings), loss_increase=float(best[need]),
                  per_block=per_block)


def corrected_aim(history: list[tuple[float, float]], target: float) -> float:
    """The speedup to ask the knapsack for next, from every (aim, measured speedup) so far.

    When one check landed below the target and another above, the next aim is interpolated between
    the closest two (the measured speedup grows with the aim); otherwise the last aim is scaled by
    the last miss (target / measured)."""
    below = [h for h in history if h[1] < target]
    above = [h for h in history if h[1] >= target]
    if below and above:
        (a0, m0), (a1, m1) = max(below, key=lambda h: h[1]), min(above, key=lambda h: h[1])
        if m1 > m0:
            return a0 + (a1 - a0) * (target - m0) / (m1 - m0)
    aim, measured = history[-1]
    return aim * target / measured
