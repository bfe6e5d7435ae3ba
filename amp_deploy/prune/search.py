"""Width of every block's MLP (AMP, step 2): binary search from the last block to the first.

For block i, candidate widths keep the top-scored neurons; a candidate is accepted when the
validation loss grows by at most `threshold` over the last accepted loss. Blocks before i are still
whole while i is searched, so the hidden states entering block i never change during its search:
they are computed once (one full pass at the start) and replayed, and each step runs only blocks
i..end. `cached=False` runs every step through the whole model, as the reference code does.

Across processes (torchrun), each rank evaluates every world-th validation batch and the loss sums
are all-reduced, so every rank takes the same decisions and settles the same widths as one process
(within float noise).

A loss with `reference = True` (score.Divergence) is handed the unpruned model's outputs on the
same batch, recorded in the first pass. A level loss (the reference's entropy) can FALL as neurons
go: a block whose accepted loss fell below the loss before it by more than the threshold is
recorded in `SearchResult.fell`, so the build can say that the criterion, not redundancy, chose it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from amp_deploy.data import Split
from amp_deploy.errors import require_finite
from amp_deploy.numerics import fp32_reference
from amp_deploy.prune.compensate import Compensator
from amp_deploy.prune.families import Loaded, count_params
from amp_deploy.prune.rebuild import (
    apply_shapes,
    apply_widths,
    cut_attention,
    cut_mlp,
    keep_top,
    set_attention,
    set_modules,
)
from amp_deploy.prune.score import rank_world
from amp_deploy.prune.shape import BlockShape, HasShapes, shapes_of

CACHE_ON_DEVICE_BYTES = 4 << 30  # cached block inputs beyond this go to host memory


class _Skip(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


class _Replay(nn.Module):
    """Stands in for block i-1: returns the cached input of block i for the current batch."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x, *args, **kwargs):
        return self.value


@dataclass
class SearchResult(HasShapes):
    """What an adaptive search chose, and what it cost (block forwards per validation batch)."""

    shapes: list[BlockShape]  # per block, the MLP width and (where searched, prune.heads) the head count
    losses: list[float]  # accepted validation loss after each block (last block first)
    base_loss: float
    block_forwards: int = 0
    block_forwards_naive: int = 0
    steps: list[list[tuple[int, float, bool]]] = field(default_factory=list)  # per block: (w, loss, ok)
    fell: list[dict] = field(default_factory=list)  # blocks whose accepted loss fell by more than the threshold
    head_steps: list[list[tuple[int, float, bool]]] = field(default_factory=list)  # per block: (heads, loss, ok)


class _Evaluator:
    """Validation loss of the model as it is now, starting at block `start` from cached inputs."""

    def __init__(self, loaded: Loaded, val: Split, batch_size: int, loss: Callable, device: torch.device,
                 cached: bool, autocast: bool = False) -> None:
        self.loaded, self.loss, self.device, self.cached, self.autocast = loaded, loss, device, cached, autocast
        self.rank, self.world = rank_world()
        self.batches = list(val.batches(batch_size, self.rank, self.world))  # this rank's share
        self.depth = len(loaded.sites)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(self.depth)]
        self.refs: list[torch.Tensor] | None = [] if getattr(loss, "reference", False) else None
        self.block_forwards = 0
        self.cached_bytes = 0

    @torch.no_grad()
    def first_pass(self) -> float:
        """Full pass of the unpruned model; records each block's input when caching."""
        blocks = self.loaded.block_list()
        hooks = []
        if self.cached:
            for i in range(1, self.depth):
                hooks.append(blocks[i].register_forward_pre_hook(
                    lambda _m, args, i=i: self.inputs[i].append(self._store(args[0]))))
        try:
            return self._run(0)
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def __call__(self, start: int) -> float:
        if not self.cached or start == 0:
            return self._run(0)
        blocks = self.loaded.block_list()
        saved = [blocks[j] for j in range(start)]
        replay = _Replay()
        for j in range(start - 1):
            blocks[j] = _Skip()
        blocks[start - 1] = replay
        try:
            return self._run(start, replay)
        finally:
            for j, mod in enumerate(saved):
                blocks[j] = mod

    def _run(self, start: int, replay: _Replay | None = None) -> float:
        total, count = 0.0, 0
        for b, (x, labels) in enumerate(self.batches):
            if replay is not None:
                replay.value = self.inputs[start][b].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.loaded.model(x.to(self.device))
            require_finite(out, f"search (block {start})")
            labels = labels.to(self.device) if labels is not None else None
            if self.refs is None:
                value = self.loss(out, labels)
            else:
                if len(self.refs) <= b:  # the first pass: the unpruned model's outputs are the reference
                    self.refs.append(out.float())
                value = self.loss(out, labels, self.refs[b])
            total += value.double().sum().item()
            count += len(x)
        self.block_forwards += self.depth - start
        if self.world > 1:  # every rank gets the same sums, hence the same decisions
            t = torch.tensor([total, float(count)], dtype=torch.float64,
                             device=self.device if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        return total / count

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        """Keep cached hidden states on the GPU while they are small; past a budget, in host memory.

        The cache holds every block's input for every validation image (ViT-g/14, 256 images:
        ~15 GB in fp32), so giant models keep it in pinned host memory and copy one block's worth
        back per bisection step.
        """
        if t.device.type != "cuda":
            return t
        self.cached_bytes += t.numel() * t.element_size()
        if self.cached_bytes <= CACHE_ON_DEVICE_BYTES:
            return t
        return t.to("cpu", non_blocking=False).pin_memory()

    def release(self, i: int) -> None:
        self.inputs[i] = []


def width_grid(h: int, align: int) -> list[int]:
    """Allowed widths for a hidden size h: multiples of `align` up to h, and h itself."""
    return sorted({min(k * align, h) for k in range(1, -(-h // align) + 1)})


def adaptive_widths(loaded: Loaded, scores: list[torch.Tensor], val: Split, *, loss: Callable, threshold: float,
                    batch_size: int = 64, steps: int = 6, align: int = 1, device: torch.device | None = None,
                    cached: bool = True, autocast: bool = False,
                    on_block: Callable[[int, int], None] | None = None,
                    head_scores: list[torch.Tensor] | None = None, comp: Compensator | None = None) -> SearchResult:
    """Binary-search each block's width (last block first) and prune `loaded` in place.

    Args:
        loaded: the unpruned model; pruned in place.
        scores: per block, the importance of each hidden neuron (higher is kept first).
        val: validation images (and labels, for the ce criterion).
        loss: `fn(out, labels) -> per-image loss` (`loss_fn`), or with `reference = True`
            `fn(out, labels, ref)` (`score.Divergence`).
        threshold: the validation loss a block may add over the last accepted loss (nats of the
            loss: with `divergence`, of KL from the original, so the whole model departs by at most
            about depth * threshold).
        batch_size: validation batch size.
        steps: bisection steps per block.
        align: kept widths are multiples of this (and the full width).
        device: where to run (CPU by default).
        cached: replay the hidden states entering each block instead of running the whole model.
        autocast: bf16 autocast for the validation passes (giant models on CUDA); off, the losses
            are fp32 references.
        on_block: called with (block, width) as each block is settled.
        head_scores: per block, the importance of each attention head: then, once a block's width is
            settled, its head count is bisected the same way (from one head to all, the loss chained
            on from the width's), and the result's shapes have their head counts.
        comp: re-fits each candidate's output layer (prune.compensate), so every width and head
            count is judged as it will ship.
    """
    with fp32_reference():  # the losses are fp32 references
        ev = _Evaluator(loaded, val, batch_size, loss, device or torch.device("cpu"), cached, autocast)
        prev = ev.first_pass()
        shapes = loaded.shapes() if head_scores is not None else shapes_of(loaded.widths())
        result = SearchResult(shapes=shapes, losses=[], base_loss=prev)
        naive = ev.depth  # the reference scheme: the whole model for the first pass and every step
        for i in reversed(range(ev.depth)):
            before = prev
            width, prev, trace = _bisect_block(loaded, i, scores[i], ev, prev, threshold, steps, align, comp)
            shapes[i] = shapes[i]._replace(width=width)
            naive += ev.depth * len(trace)
            if head_scores is not None:
                heads, prev, head_trace = _bisect_heads(loaded, i, head_scores[i], ev, prev, threshold, steps, comp)
                shapes[i] = shapes[i]._replace(heads=heads)
                naive += ev.depth * len(head_trace)
                result.head_steps.append(head_trace)
            if prev < before - threshold:
                result.fell.append({"block": i, "width": width, "loss_before": before, "loss": prev})
            result.losses.append(prev)
            result.steps.append(trace)
            ev.release(i)
            if on_block:
                on_block(i, width)
        result.steps.reverse()
        result.head_steps.reverse()
        result.block_forwards, result.block_forwards_naive = ev.block_forwards, naive
        return result


def _bisect_block(loaded: Loaded, i: int, scores: torch.Tensor, ev: _Evaluator, prev: float, threshold: float,
                  steps: int, align: int, comp: Compensator | None = None
                  ) -> tuple[int, float, list[tuple[int, float, bool]]]:
    """Settle block i: the smallest accepted width (or the whole block), the loss it leaves, the trace."""
    original = loaded.mlp_modules(i)
    return _bisect(width_grid(original["fc_out"].in_features, align), ev, i, prev, threshold, steps,
                   lambda w: set_modules(loaded, i, cut_mlp(loaded, i, original, keep_top(scores, w), comp)),
                   lambda: set_modules(loaded, i, original))


def _bisect_heads(loaded: Loaded, i: int, scores: torch.Tensor, ev: _Evaluator, prev: float, threshold: float,
                  steps: int, comp: Compensator | None = None) -> tuple[int, float, list[tuple[int, float, bool]]]:
    """Settle block i's head count as its width: candidates 1..H keep the top-scored heads."""
    original = loaded.attn_modules(i)
    site = loaded.attn[i]
    return _bisect(list(range(1, original["proj"].in_features // site.head_dim + 1)), ev, i, prev, threshold, steps,
                   lambda h: set_attention(loaded, i, cut_attention(loaded, i, original, keep_top(scores, h), comp)),
                   lambda: set_attention(loaded, i, original))


def _bisect(grid: list[int], ev: _Evaluator, i: int, prev: float, threshold: float, steps: int,
            cut: Callable[[int], None], restore: Callable[[], None]) -> tuple[int, float, list[tuple[int, float, bool]]]:
    """Bisection over `grid` (ascending; its last entry is the unpruned size): each candidate is `cut`
    into block i and accepted when the loss grows by at most `threshold`; the smallest accepted one is
    left in place (or, with none, `restore`d), with the loss it leaves and the trace."""
    left, right, best, best_loss, trace = -1, len(grid) - 1, None, prev, []
    for _ in range(steps):
        mid = (left + right) // 2
        if mid <= left:
            break
        cut(grid[mid])
        cand = ev(i)
        ok = cand - prev <= threshold
        trace.append((grid[mid], cand, ok))
        if ok:
            right, best, best_loss = mid, grid[mid], cand
        else:
            left = mid
    if best is None:
        restore()
        return grid[-1], prev, trace
    cut(best)
    return best, best_loss, trace


def uniform_widths(widths: list[int], keep_ratio: float, align: int) -> list[int]:
    """The same fraction of neurons in every block, rounded to the nearest allowed width."""
    out = []
    for h in widths:
        grid = width_grid(h, align)
        out.append(min(grid, key=lambda w: (abs(w - keep_ratio * h), -w)))
    return out


@torch.no_grad()
def model_losses(original: Loaded, models: list[Loaded], val: Split, *, loss: Callable, batch_size: int = 64,
                 device: torch.device | None = None) -> list[float]:
    """The search loss of each whole model over the validation images, against `original`'s outputs
    (a loss that compares with the original gets the unpruned model's outputs as its reference)."""
    with fp32_reference():
        ev = _Evaluator(original, val, batch_size, loss, device or torch.device("cpu"), cached=False)
        ev.first_pass()
        out = []
        for m in models:
            ev.loaded = m
            out.append(ev._run(0))
        return out


def uniform_for_params(fresh: Callable[[], Loaded], scores: list[torch.Tensor], target_params: int, align: int,
                       rounds: int = 14, comp: Compensator | None = None) -> tuple[Loaded, list[int]]:
    """The largest same-fraction-in-every-block widths whose model has at most `target_params`
    parameters: bisection over the kept fraction, each probe a pruned copy from `fresh()` (the chosen
    one re-fitted by `comp`: a re-fit never changes the parameter count)."""
    def build(ratio: float, refit: Compensator | None = None) -> tuple[Loaded, list[int], int]:
        loaded = fresh()
        widths = uniform_widths(loaded.widths(), ratio, align)
        apply_widths(loaded, scores, widths, refit)
        return loaded, widths, count_params(loaded.model)

    lo, hi, best, ratio = 0.0, 1.0, None, 0.0
    for _ in range(rounds):
        mid = (lo + hi) / 2
        cand = build(mid)
        if cand[2] <= target_params:
            lo, best, ratio = mid, cand, mid
        else:
            hi = mid
    best = best or build(0.0)
    if comp is not None:
        best = build(ratio, comp)
    return best[0], best[1]


def smallest_params(fresh: Callable[[], Loaded], scores: list[torch.Tensor], align: int, heads: bool = False
                    ) -> tuple[int, list[int]]:
    """The parameters of the smallest model pruning can reach (every block at its smallest allowed
    width, and with `heads` one attention head; embeddings and the head stay), and those widths."""
    smallest = fresh()
    floor = uniform_widths(smallest.widths(), 0.0, align)
    apply_shapes(smallest, shapes_of(floor, [1] * len(floor) if heads else None), scores)
    return count_params(smallest.model), floor


def uniform_check(original: Loaded, pruned: Loaded, fresh: Callable[[], Loaded], scores: list[torch.Tensor],
                  budget: int, align: int, losses: Callable[[list[Loaded]], list[float]],
                  comp: Compensator | None = None) -> dict:
    """The threshold search's model (`pruned`) against the same fraction of neurons in every block
    within the same `budget` of parameters, both scored by `losses([original, pruned, uniform])` (the
    search loss of the last two against the first): the one that departs less is `chosen` (the
    greedy per-block threshold can lose to uniform widths on its own loss at deep cuts). A uniform model
    over the budget (it keeps every head: below the MLP-only floor none fits) is never chosen."""
    uniform, widths = uniform_for_params(fresh, scores, budget, align, comp=comp)
    ours, theirs = losses([original, pruned, uniform])
    fits = count_params(uniform.model) <= budget  # below the MLP-only floor no uniform width fits
    chosen = "uniform" if fits and (theirs < ours or count_params(pruned.model) > budget) else "adaptive"
    return {"widths": widths, "params": count_params(uniform.model), "loss": theirs,
            "adaptive_widths": pruned.widths(), "adaptive_params": count_params(pruned.model), "adaptive_loss": ours,
            "fits": fits, "chosen": chosen}


def budget_widths(fresh: Callable[[], Loaded], target_params: int, run: Callable[[Loaded, float], SearchResult],
                  rounds: int = 12, tolerance: int = 0, start: float = 1e-3
                  ) -> tuple[Loaded, SearchResult, float, list[tuple[float, int, int]]]:
    """Outer search over the threshold for the largest model within `target_params` parameters.

    `fresh()` gives an unpruned copy; `run(loaded, threshold)` prunes it adaptively. A larger
    threshold prunes more, so the smallest threshold that meets the budget is bisected for: from
    `start`, the threshold is multiplied or divided by 4 until the budget is bracketed, then
    bisected (geometrically: thresholds span decades) for at most `rounds` steps, stopping early
    once the model is within `tolerance` parameters under the budget. Returns the pruned copy, its
    search, the threshold and every (threshold, params, block forwards) tried.
    """
    tried: list[tuple[float, int, int]] = []

    def attempt(t: float):
        loaded = fresh()
        res = run(loaded, t)
        params = count_params(loaded.model)
        tried.append((t, params, res.block_forwards))
        return loaded, res, params

    lo, hi, best = 0.0, start, attempt(start)
    if best[2] <= target_params:  # shrink until the budget is missed (at most `rounds` times)
        for _ in range(rounds):
            if best[2] >= target_params - tolerance:
                break
            cand = attempt(hi / 4)
            if cand[2] > target_params:
                lo = hi / 4
                break
            hi, best = hi / 4, cand
    while best[2] > target_params and hi < 1e3:  # grow until the budget is met (or nothing is left)
        lo, hi = hi, hi * 4
        best = attempt(hi)
    best_t = hi
    if best[2] <= target_params:
        for _ in range(rounds):
            if best[2] >= target_params - tolerance or lo <= 0:
                break
            mid = (lo * hi) ** 0.5
            cand = attempt(mid)
            if cand[2] <= target_params:
                hi, best, best_t = mid, cand, mid
            else:
                lo = mid
    return best[0], best[1], best_t, tried
