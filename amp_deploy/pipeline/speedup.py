"""The search to a latency budget (`prune.target_speedup` / `prune.target_latency_ms`): the recipe side.

`prune.budget` does the arithmetic on plain values; this module makes the runners the budget is
measured with (the recipe's runtime, batch and precision, from the same export settings as the
build), times them interleaved, and runs the measure -> choose -> check -> correct loop:

1. latency table: the model with every block at each candidate width, and the full model (each
   candidate prepared once; its runner kept open between passes while memory allows, else opened
   only while it is timed); with `prune.heads`, also every block at each candidate head count, its
   MLP at the candidate width below whole (`prune.budget`: the first cut's step counted once);
2. loss curves: each block alone at each candidate width (and head count), by the search's cached
   evaluator;
3. widths (and heads) by knapsack for the target; the chosen model measured end to end against the full
   model (interleaved); when the measured speedup is off by more than `latency.tolerance`, the
   knapsack is asked for a corrected speedup (`latency.corrections` times at most). The check
   closest to the target wins.

`prune.latency.baseline: fp32` asks the speedup over the original in fp32 on the same runtime (an
INT8 build against the fp32 model it replaces): the original in fp32 and in the budget's precision
are timed interleaved once (their ratio turns the table's predictions into speedups over fp32), and
the end-to-end checks time each chosen model against the fp32 original, so the correction closes on
what the user asked.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from amp_deploy.deploy.runtimes import Runner, Unavailable
from amp_deploy.errors import UserError, first_line
from amp_deploy.measure import metrics as M
from amp_deploy.pipeline.context import Context, compile_settings
from amp_deploy.prune import budget as B
from amp_deploy.prune.families import Loaded
from amp_deploy.prune.rebuild import apply_shapes
from amp_deploy.prune.score import rank_world
from amp_deploy.prune.shape import BlockShape, shapes_of, to_json

TIMING_CALIBRATION = 16  # int8 candidates are calibrated on this many images: scales change no latency


class _Cast(nn.Module):
    """Runs a model in half precision on float32 input (the torch fp16/bf16 rows)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


def unavailable_reason(lat, device_type: str) -> str | None:
    """Why the budget's runtime (a recipe's `prune.latency`) cannot be measured on this machine with
    the build's device (None when it can): checked before any work."""
    from amp_deploy.deploy.runtimes import tensorrt_unavailable_reason

    if lat.runtime == "tensorrt":
        return tensorrt_unavailable_reason()
    if lat.runtime == "openvino":
        from amp_deploy.deploy.openvino import bf16_problem, openvino_problem

        return openvino_problem(lat.precision == "int8") or (bf16_problem() if lat.precision == "bf16" else None)
    if (lat.runtime == "onnxruntime-cuda" or (lat.runtime == "torch" and lat.precision != "fp32")) \
            and device_type != "cuda":
        return f"{lat.runtime} {lat.precision} needs a CUDA GPU (the build's device is {device_type})"
    return None


Opener = Callable[[], Runner]  # opens a prepared candidate's runner (and only then holds its weights)


def runner_factory(ctx: Context, input_size: tuple[int, int, int], work: Path, precision: str | None = None
                   ) -> Callable[[Callable[[], nn.Module], str], Opener]:
    """A function that prepares a model for the budget's runtime as the build would (exported,
    quantized or compiled into `work`) and returns what opens its runner. Only the files stay: the
    model is built by `build()` when needed and dropped, and a runner holds weights only once opened
    (`_table` decides whether runners stay open between passes). `precision`: another precision than
    the budget's on the same runtime (the fp32 baseline of `prune.latency.baseline: fp32`)."""
    from amp_deploy.deploy import runtimes as R
    from amp_deploy.deploy.export import export_onnx

    lat, e, v = ctx.recipe.prune.latency, ctx.recipe.export, ctx.recipe.validate_
    prec = precision or lat.precision

    def exported(model: nn.Module, tag: str, precision: str = "fp32") -> Path:
        return export_onnx(model.cpu().float(), work / f"{tag}.onnx", input_size, opset=e.opset,
                           batch_min=e.batch.min, batch_opt=e.batch.opt, batch_max=e.batch.max,
                           exporter=e.exporter, precision=precision)

    if lat.runtime == "torch":
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec)

        def torch_model(build: Callable[[], nn.Module], tag: str) -> Opener:
            return lambda: R.torch_runner(_Cast(build(), dtype) if dtype else build(), v.threads, ctx.device)

        return torch_model
    if lat.runtime == "tensorrt":
        return _tensorrt_factory(ctx, input_size, work, exported, prec)
    if lat.runtime == "openvino":
        return _openvino_factory(ctx, work, exported, prec)
    if prec == "int8":
        from amp_deploy.deploy import quantize as Q

        q = ctx.recipe.quantize
        reader = Q.CalibrationReader(Q.calibration_batches(ctx.data().calibration.batches(ctx.recipe.data.batch_size),
                                                           TIMING_CALIBRATION, e.batch.max))

        def int8(build: Callable[[], nn.Module], tag: str) -> Opener:
            dst = work / f"{tag}.int8.onnx"
            Q.quantize_onnxruntime(exported(build(), tag), dst, reader, method="minmax", per_channel=q.per_channel,
                                   op_types=q.op_types, preprocess=q.preprocess, activation=q.activations)
            return lambda: R.onnxruntime_runner(dst, v.threads)

        return int8

    providers = R.cuda_providers() if lat.runtime == "onnxruntime-cuda" else ("CPUExecutionProvider",)

    def onnx(build: Callable[[], nn.Module], tag: str) -> Opener:
        path = exported(build(), tag)
        return lambda: R.onnxruntime_runner(path, v.threads, providers)

    return onnx


def _openvino_factory(ctx: Context, work: Path, exported, precision: str
                      ) -> Callable[[Callable[[], nn.Module], str], Opener]:
    """IR converted (or quantized by NNCF, for int8) as the export and quantize stages make it, compiled
    with the precision pinned (int8: the quantized products in int8, the rest in f32)."""
    from amp_deploy.deploy import openvino as OV
    from amp_deploy.deploy import runtimes as R

    v = ctx.recipe.validate_
    batches = None
    if precision == "int8":
        from amp_deploy.deploy import quantize as Q

        batches = Q.calibration_batches(ctx.data().calibration.batches(ctx.recipe.data.batch_size),
                                        TIMING_CALIBRATION, ctx.recipe.export.batch.max)

    def make(build: Callable[[], nn.Module], tag: str) -> Opener:
        onnx_path, xml = exported(build(), tag), work / f"{tag}.xml"
        if batches is None:
            OV.convert_onnx(onnx_path, xml)
        else:
            OV.quantize_nncf(onnx_path, xml, batches, model_type=ctx.recipe.quantize.openvino_model_type)
        return lambda: R.openvino_runner(xml, v.threads, "fp32" if batches is not None else precision)

    return make


def _tensorrt_factory(ctx: Context, input_size, work: Path, exported, precision: str
                      ) -> Callable[[Callable[[], nn.Module], str], Opener]:
    """Engines built as the compile stage builds them (strongly typed from a graph in the precision)."""
    import dataclasses

    from amp_deploy.deploy import runtimes as R
    from amp_deploy.deploy.tensorrt_engine import build_engine

    c = ctx.recipe.compile
    settings = dataclasses.replace(compile_settings(ctx, input_size), precision=precision)

    def make(build: Callable[[], nn.Module], tag: str) -> Opener:
        typed = precision != "fp32" and c.strongly_typed
        onnx_path = exported(build(), tag, precision if typed else "fp32")
        plan = work / f"{tag}.plan"
        build_engine(onnx_path, plan, settings, ctx.folder.root if c.timing_cache else None)
        return lambda: R.tensorrt_runner(plan)

    return make


def timing_input(ctx: Context, batch: int):
    """A batch of real calibration images (repeated when there are fewer)."""
    x, _ = next(iter(ctx.data().calibration.batches(max(batch, 1))))
    return M.batch_of(x.float(), batch)


def _pruned(ctx: Context, shapes: list[BlockShape], scores, head_scores=None) -> nn.Module:
    loaded = ctx.original()
    apply_shapes(loaded, shapes, scores, head_scores)
    return loaded.model


def latency_search(ctx: Context, loaded: Loaded, scores,
                   curves_of: Callable[[Loaded, list[list[int]], list[list[int]] | None], B.Curves],
                   head_scores=None) -> dict:
    """Widths (and, with `head_scores`, heads) for the recipe's latency budget, with everything
    measured on the way (search.json)."""
    p = ctx.recipe.prune
    lat = p.latency
    original = loaded.widths()
    if len(set(original)) != 1:
        raise UserError(f"prune.target_speedup: the blocks' MLP widths differ ({sorted(set(original))}); the latency "
                        "table assumes blocks of one shape")
    cands = [B.candidate_widths(h, lat.widths, p.align) for h in original]
    hcands = None
    if head_scores is not None:
        original_heads = loaded.heads()
        if len(set(original_heads)) != 1:
            raise UserError(f"prune.target_speedup: the blocks' head counts differ ({sorted(set(original_heads))}); "
                            "the latency table assumes blocks of one shape")
        hcands = [B.candidate_heads(h, lat.widths) for h in original_heads]
    depth, k = len(original), len(cands[0]) + (len(hcands[0]) - 1 if hcands else 0)
    x = timing_input(ctx, lat.batch)
    # Under --nproc the loss curves are split over the ranks (the search's evaluator all-reduces them);
    # the timing runs on rank 0 alone, the others waiting, and its table and checks are sent to every rank.
    timer = rank_world()[0] == 0
    work = Path(tempfile.mkdtemp(prefix=".latency-", suffix=".tmpdir", dir=ctx.folder.root)) if timer else None
    try:
        make = runner_factory(ctx, loaded.input_size, work) if timer else None
        start = time.perf_counter()
        model_bytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        stay_open = keep_open(model_bytes, k, ctx.device if lat.runtime in ("torch", "tensorrt", "onnxruntime-cuda")
                              else torch.device("cpu"))
        table, full_runner = _table(ctx, make, scores, cands, x, stay_open, head_scores, hcands) if timer else (None,
                                                                                                                None)
        table = _from_rank0(table)
        baseline, base_runner = None, full_runner
        if lat.baseline == "fp32" and lat.precision != "fp32":
            baseline, base_runner = _fp32_baseline(ctx, loaded.input_size, work, full_runner, x) if timer \
                else (None, None)
            baseline = _from_rank0(baseline)
        seconds = {"table": round(time.perf_counter() - start, 3)}
        ratio = baseline["ratio"] if baseline else 1.0  # the budget precision's full model over fp32's
        over = f"the original in fp32 on {lat.runtime}" if baseline else "the original"
        target = p.target_speedup
        if target is None:
            if table.full_ms <= p.target_latency_ms:
                raise UserError(f"prune.target_latency_ms: {p.target_latency_ms:g} ms is met by the full model "
                                f"({table.full_ms:.3f} ms on {lat.runtime} {lat.precision} at batch {lat.batch}): "
                                "nothing to prune")
            target = table.full_ms / p.target_latency_ms * ratio
        elif target <= ratio:
            raise UserError(f"prune.target_speedup: {target:g}x over {over} is met by the full model in "
                            f"{lat.precision} ({ratio:.3f}x, measured): nothing to prune")
        advance = ctx.reporter.task("search: loss curves, block by block", depth)
        start = time.perf_counter()
        curves = curves_of(loaded, cands, hcands)
        seconds["curves"] = round(time.perf_counter() - start, 3)
        advance(depth)
        reach = B.max_speedup(table, curves) * ratio  # over the baseline
        if target > reach:
            smallest = (f" and {hcands[0][0]} of {hcands[0][-1]} heads" if hcands else "")
            rest = "embeddings and norms stay" if hcands else "attention and the rest of the model stay"
            raise UserError(
                f"prune.target_{'speedup' if p.target_speedup else 'latency_ms'}: a {target:.3g}x speedup over {over} "
                f"is out of reach on {lat.runtime} {lat.precision} at batch {lat.batch}: with every MLP at its smallest "
                f"candidate width ({cands[0][0]} of {original[0]}){smallest} the measured table predicts {reach:.3g}x "
                f"({rest})")
        rounds = _from_rank0(_checks(ctx, make, base_runner, scores, table, curves, target, reach, x, head_scores,
                                     scale=ratio) if timer else None)
    finally:
        gc.collect()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    whole = to_json(loaded.shapes() if hcands else shapes_of(original))
    pruning = [r for r in rounds if r["shapes"] != whole] or rounds
    best = min(pruning, key=lambda r: abs(r["measured_speedup"] / target - 1))  # the full model answers no budget
    return dict(
        shapes=best["shapes"], **({"head_steps": []} if hcands else {}),
        base_loss=curves.base_loss, losses=[], block_forwards=curves.block_forwards,
        block_forwards_naive=curves.block_forwards, steps=[], loss_fell=[], threshold=None,
        latency_budget={
            "runtime": lat.runtime, "batch": lat.batch, "precision": lat.precision, "target_speedup": target,
            "baseline": "fp32" if baseline else "same", **({"baseline_ratio": ratio, "baseline_timing": baseline}
                                                           if baseline else {}),
            "target_latency_ms": p.target_latency_ms, "max_speedup": reach,
            "predicted_speedup": best["predicted_speedup"], "measured_speedup": best["measured_speedup"],
            "met": abs(best["measured_speedup"] / target - 1) <= lat.tolerance, "tolerance": lat.tolerance,
            "checks": rounds, "table": table.to_dict(), "curves": curves.to_dict(), "candidates": k,
            "runners_kept_open": stay_open,
            "seconds": {**seconds, "checks": round(sum(r["seconds"] for r in rounds), 3)},
        })


def _fp32_baseline(ctx: Context, input_size, work: Path, full: Runner, x) -> tuple[dict, Runner]:
    """`prune.latency.baseline: fp32`: the original in fp32 on the budget's runtime, timed interleaved
    with the original in the budget's precision (twice the table's rounds); its runner stays open for
    the end-to-end checks, which time every chosen model against it. `ratio`: how much faster the
    original runs in the budget's precision (the table's speedups times it are speedups over fp32)."""
    lat = ctx.recipe.prune.latency
    make = runner_factory(ctx, input_size, work, precision="fp32")
    try:
        fp32 = make(lambda: ctx.original().model, "baseline-fp32")()
    except Unavailable as err:
        raise UserError(f"prune.latency.baseline fp32: {lat.runtime} fp32 cannot run here: {first_line(err)}") from None
    stats = M.latency({"fp32": fp32, "full": full}, x, lat.warmup, 2 * lat.iterations)
    ratio = M.median_ratio(stats["fp32"]["samples"], stats["full"]["samples"])
    return {"ratio": ratio, "fp32_ms": stats["fp32"]["p50"], "full_ms": stats["full"]["p50"]}, fp32


def _from_rank0(value):
    """Rank 0's `value` on every rank (one process: the value itself). Sent between the build's own
    processes over their process group, never read from a file."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


TABLE_PASSES = 3  # the table's rounds are split into passes over every candidate: drift spreads over all of them
KEEP_OPEN_SHARE = 0.25  # candidates stay open between passes while their weights take at most this much memory


def available_bytes(device: torch.device) -> int | None:
    """Memory free for more runners: the GPU's free memory for a GPU runtime, else the host's
    MemAvailable (Linux); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from amp_deploy.pipeline.memory import proc_kib

    free = proc_kib("/proc/meminfo", "MemAvailable")
    return None if free is None else free << 10


def keep_open(model_bytes: int, candidates: int, device: torch.device) -> bool:
    """Whether every candidate's runner may stay open between passes (each is at most the full
    model's size): a session opened afresh runs its first calls slower, which a table of small
    differences feels, so runners stay open when memory allows, and are opened one at a time when
    it does not (a giant model on one GPU)."""
    free = available_bytes(device)
    return free is not None and model_bytes * candidates <= KEEP_OPEN_SHARE * free


def _table(ctx: Context, make, scores, cands: list[list[int]], x, stay_open: bool = True, head_scores=None,
           hcands: list[list[int]] | None = None) -> tuple[B.LatencyTable, Runner]:
    """Each candidate timed against the full model, two runners at a time (as the end-to-end checks
    are), in TABLE_PASSES passes over all candidates so that a slow phase of the machine hits them alike.
    Candidates: every block at each width (heads whole) and, with `hcands`, every block at each head
    count (every MLP at the candidate width below whole). With `stay_open` each candidate's runner is
    opened once and kept until the table is done; without, it is opened for each pass and closed after
    it (one candidate in memory at a time)."""
    lat = ctx.recipe.prune.latency
    whole = shapes_of([c[-1] for c in cands])
    entries = {("w", c): lambda w=[b[j] for b in cands]: _pruned(ctx, shapes_of(w), scores)
               for j, c in enumerate(cands[0][:-1])}
    base = [c[-2] if len(c) > 1 else c[-1] for c in cands]  # the heads axis is timed at these MLP widths
    if hcands:
        entries |= {("h", c): lambda h=[b[j] for b in hcands]: _pruned(ctx, shapes_of(base, h), scores, head_scores)
                    for j, c in enumerate(hcands[0][:-1])}
    axes = f"{len(cands[0])} widths" + (f" and {len(hcands[0])} head counts" if hcands else "")
    advance = ctx.reporter.task(f"search: latency table ({axes} on {lat.runtime} {lat.precision}, "
                                f"batch {lat.batch})", len(entries) + 1 + TABLE_PASSES)
    openers: dict[tuple[str, int], Opener] = {}
    try:
        for key, model in entries.items():
            openers[key] = make(model, f"{key[0]}{key[1]}")
            advance(1)
        full = make(lambda: _pruned(ctx, whole, scores), f"w{whole[0].width}")()  # stays open for the checks
        advance(1)
    except Unavailable as err:
        raise UserError(f"prune.latency.runtime {lat.runtime}: cannot run here: {first_line(err)}") from None
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in openers}
    full_samples: dict[tuple[str, int], list[float]] = {key: [] for key in openers}
    per_pass = max(1, -(-lat.iterations // TABLE_PASSES))
    kept: dict[tuple[str, int], Runner] = {}
    for _ in range(TABLE_PASSES):
        for key, opener in openers.items():
            runner = kept.get(key) or opener()
            stats = M.latency({"full": full, "cand": runner}, x, lat.warmup, per_pass)
            if stay_open:
                kept[key] = runner
            del runner
            gc.collect()
            samples[key] += stats["cand"]["samples"]
            full_samples[key] += stats["full"]["samples"]
        advance(1)
    kept.clear()

    def axis(kind: str, got: dict) -> dict[int, list[float]]:
        return {s: v for (k, s), v in got.items() if k == kind}

    heads = dict(heads=hcands[0], head_samples=axis("h", samples), head_full_samples=axis("h", full_samples),
                 head_base=base[0]) if hcands else {}
    table = B.latency_table(cands[0], len(cands), axis("w", samples), axis("w", full_samples), **heads)
    return table, full


def _checks(ctx: Context, make, full: Runner, scores, table: B.LatencyTable, curves: B.Curves, target: float,
            reach: float, x, head_scores=None, scale: float = 1.0) -> list[dict]:
    """Choose, measure end to end, correct: one record per check. `full` is the baseline every check
    is timed against: the original in the budget's precision, or (`scale`: how much faster that runs
    than the original in fp32, `prune.latency.baseline: fp32`) the fp32 original; `target`, `reach`,
    the aims and the predictions are speedups over the baseline (the table's times `scale`)."""
    lat = ctx.recipe.prune.latency
    rounds: list[dict] = []
    aim = target
    advance = ctx.reporter.task("search: end-to-end check of the chosen widths", lat.corrections + 1)
    for n in range(lat.corrections + 1):
        aim = min(max(aim, scale), reach)  # a check that overshot can correct the aim below the full model's
        choice = B.choose_widths(table, curves, aim / scale)
        start = time.perf_counter()
        runner = make(lambda c=choice: _pruned(ctx, c.shapes, scores, head_scores), f"check{n}")()
        stats = M.latency({"full": full, "pruned": runner}, x, lat.warmup, 2 * lat.iterations)
        measured = 1.0 / M.median_ratio(stats["pruned"]["samples"], stats["full"]["samples"])
        rounds.append({"aim": aim, "shapes": to_json(choice.shapes),
                       "predicted_speedup": choice.predicted_speedup * scale,
                       "measured_speedup": measured, "loss_increase": choice.loss_increase,
                       "full_ms": stats["full"]["p50"], "pruned_ms": stats["pruned"]["p50"],
                       "seconds": round(time.perf_counter() - start, 3)})
        del runner
        gc.collect()
        advance(1, f"search: end-to-end check {n + 1}: {measured:.3f}x measured for {target:.3g}x")
        if abs(measured / target - 1) <= lat.tolerance or (aim >= reach and measured < target):
            break
        aim = B.corrected_aim([(r["aim"], r["measured_speedup"]) for r in rounds], target)
    return rounds
