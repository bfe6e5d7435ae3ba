"""The stages of a build and the stage table. Each reads its inputs from the output folder and
writes its own files atomically.

These are the only functions that read the recipe; they turn it into plain arguments for the
library (prune/, deploy/, measure/).
"""

from __future__ import annotations

import time

from amp_deploy.build.context import Context, Stage
from amp_deploy.build.validate_stage import stage_validate
from amp_deploy.checkpoint import load_pruned_model, save_pruned
from amp_deploy.errors import UserError, first_line
from amp_deploy.prune.families import Loaded, count_params
from amp_deploy.prune.rebuild import apply_widths
from amp_deploy.prune.score import loss_fn, magnitude_scores, random_scores, rank_world, taylor_scores
from amp_deploy.prune.search import adaptive_widths, budget_widths, uniform_widths


def stage_score(ctx: Context) -> None:
    p = ctx.recipe.prune
    loaded, data = ctx.original(), ctx.data()
    if p.criterion == "ce" and (data.calibration.labels is None or loaded.output != "logits"):
        raise UserError("prune.criterion: 'ce' needs labelled data (data.source: digits) and a classifier head")
    start = time.perf_counter()
    rank, world = rank_world()  # across processes, each rank takes every world-th batch
    if p.criterion in ("entropy", "ce"):
        bs = ctx.recipe.data.batch_size
        advance = ctx.reporter.task("score: Taylor importance", -(-len(data.calibration.images) // bs))

        def batches():
            for j, b in enumerate(data.calibration.batches(bs)):
                if j % world == rank:
                    yield b
                advance(1)

        sums = taylor_scores(loaded, batches(), loss_fn(p.criterion, loaded.output, p.temperature), ctx.device,
                             autocast=ctx.device.type == "cuda", checkpointing=p.checkpointing)
    else:
        s = magnitude_scores(loaded) if p.criterion == "magnitude" else random_scores(loaded, ctx.recipe.data.seed)
        sums = {"abs": s, "signed": [t.clone() for t in s]}
    if rank == 0:  # rank 0 alone writes
        ctx.folder.write_scores(sums, {"criterion": p.criterion, "seconds": f"{time.perf_counter() - start:.3f}"})


def stage_search(ctx: Context) -> None:
    p = ctx.recipe.prune
    scores = ctx.folder.read_scores(p.taylor)
    start = time.perf_counter()
    loaded = ctx.original()
    original = loaded.widths()
    result: dict = {"original_widths": original, "search": p.search, "threshold": p.threshold}
    if p.search == "uniform":
        result.update(widths=uniform_widths(original, p.keep_ratio, p.align), block_forwards=0,
                      block_forwards_naive=0)
    else:
        result.update(_adaptive_search(ctx, loaded, scores))
    result["seconds"] = round(time.perf_counter() - start, 3)
    ctx.folder.write_search(result)


def _adaptive_search(ctx: Context, loaded: Loaded, scores) -> dict:
    p, data = ctx.recipe.prune, ctx.data()
    loss = loss_fn("ce" if p.criterion == "ce" else "entropy", loaded.output, p.temperature)

    def run(target: Loaded, threshold: float, on_block=None):
        return adaptive_widths(target, scores, data.validation, loss=loss, threshold=threshold,
                               batch_size=ctx.recipe.data.batch_size, steps=p.steps, align=p.align,
                               device=ctx.device, cached=p.cache, on_block=on_block)

    extra: dict = {}
    if p.target_params is None:
        advance = ctx.reporter.task("search: widths, last block first", len(loaded.sites))
        res = run(loaded, p.threshold, lambda i, w: advance(1))
    else:
        budget = int(p.target_params * count_params(loaded.model))
        advance = ctx.reporter.task("search: threshold for the parameter budget", None)

        def run_counted(target: Loaded, threshold: float):
            advance(1)
            return run(target, threshold)

        _, res, threshold, tried = budget_widths(ctx.original, budget, run_counted)
        extra = dict(threshold=threshold, target_params=p.target_params, budget_params=budget,
                     thresholds_tried=tried, block_forwards_all_thresholds=sum(t[2] for t in tried))
    return dict(widths=res.widths, base_loss=res.base_loss, losses=res.losses, block_forwards=res.block_forwards,
                block_forwards_naive=res.block_forwards_naive, steps=res.steps, **extra)


def stage_rebuild(ctx: Context) -> None:
    loaded = ctx.original()
    scores = ctx.folder.read_scores(ctx.recipe.prune.taylor)
    search = ctx.folder.read_search()
    apply_widths(loaded, scores, search["widths"])
    loaded.model.cpu()
    save_pruned(loaded, ctx.folder.pruned, search["original_widths"])


def _models(ctx: Context) -> dict[str, Loaded]:
    """The original and the pruned model, on the CPU in fp32 (what the exports are made from)."""
    models = {"original": ctx.original(), "pruned": load_pruned_model(ctx.folder.pruned)}
    for loaded in models.values():
        loaded.model.cpu().float()
    return models


def _export(ctx: Context, loaded: Loaded, which: str, precision: str = "fp32"):
    from amp_deploy.deploy.export import export_onnx

    e = ctx.recipe.export
    return export_onnx(loaded.model, ctx.folder.onnx(which, precision), loaded.input_size, opset=e.opset,
                       batch_min=e.batch.min, batch_opt=e.batch.opt, batch_max=e.batch.max, exporter=e.exporter,
                       precision=precision)


def stage_export(ctx: Context) -> None:
    advance = ctx.reporter.task("export: ONNX", 2)
    for which, loaded in _models(ctx).items():
        _export(ctx, loaded, which)
        advance(1)


def compile_settings(ctx: Context, input_size: tuple[int, int, int]):
    """TensorRT build settings from the recipe's compile and export sections."""
    from amp_deploy.deploy.tensorrt_engine import BuildSettings

    c, b = ctx.recipe.compile, ctx.recipe.export.batch
    return BuildSettings(c.precision, b.min, b.opt, b.max, tuple(input_size), workspace_mib=c.workspace_mib,
                         optimization_level=c.optimization_level, strongly_typed=c.strongly_typed)


def stage_compile(ctx: Context) -> str | None:
    """TensorRT engines for the original and the pruned model, or why there are none."""
    from amp_deploy.deploy.runtimes import tensorrt_unavailable_reason

    if "tensorrt" not in ctx.recipe.runtimes:
        status = {"status": "skipped", "reason": "tensorrt is not in the recipe's runtimes"}
    elif reason := tensorrt_unavailable_reason():
        status = {"status": "skipped", "reason": reason}
    else:
        status = _build_engines(ctx)
    ctx.folder.write_compile_status(status)
    return status["reason"] if status["status"] == "failed" else None


def _build_engines(ctx: Context) -> dict:
    from amp_deploy.deploy.tensorrt_engine import build_engine

    c = ctx.recipe.compile
    engines = {}
    advance = ctx.reporter.task("compile: TensorRT engines", 2)
    try:
        for which, loaded in _models(ctx).items():
            onnx_path = ctx.folder.onnx(which)
            if c.precision != "fp32" and c.strongly_typed:  # the graph carries the precision
                onnx_path = _export(ctx, loaded, which, c.precision)
            engines[which] = build_engine(onnx_path, ctx.folder.plan(which), compile_settings(ctx, loaded.input_size),
                                          ctx.folder.root if c.timing_cache else None)
            advance(1)
    except Exception as err:  # noqa: BLE001 - a failed build is a report row, not a crash
        return {"status": "failed", "reason": f"{type(err).__name__}: {first_line(err, 400)}"}
    return {"status": "ok", "precision": c.precision, "engines": engines}


STAGES: tuple[Stage, ...] = (
    Stage("score", ("model", "data", "prune.criterion", "prune.temperature"), lambda f: [f.scores], stage_score),
    Stage("search", ("prune",), lambda f: [f.search], stage_search),
    Stage("rebuild", (), lambda f: [f.pruned], stage_rebuild),
    Stage("export", ("export",), lambda f: [f.onnx("original"), f.onnx("pruned")], stage_export),
    Stage("compile", ("runtimes", "compile"), lambda f: [f.compile_status, *f.engine_files()], stage_compile,
          machine_bound=True),
    Stage("validate", ("validate", "runtimes", "compile"), lambda f: [f.report_json, f.report_md], stage_validate,
          machine_bound=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
PRUNE_STAGES = ("score", "search", "rebuild")
