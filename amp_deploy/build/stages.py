"""The stages of a build and the stage table. Each reads its inputs from the output folder and
writes its own files atomically.

These are the only functions that read the recipe; they turn it into plain arguments for the
library (prune/, deploy/, measure/).
"""

from __future__ import annotations

import time

import torch

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
        advance = ctx.reporter.task("score: Taylor importance (reading images)", -(-len(data.calibration) // bs) // world)

        def batches():
            for b in data.calibration.batches(bs, rank, world):
                yield b
                advance(1)

        sums = taylor_scores(loaded, batches(), _loss(ctx, loaded, p.criterion), ctx.device,
                             autocast=ctx.device.type == "cuda", checkpointing=p.checkpointing)
    else:
        s = magnitude_scores(loaded) if p.criterion == "magnitude" else random_scores(loaded, ctx.recipe.data.seed)
        sums = {"abs": s, "signed": [t.clone() for t in s]}
    if rank == 0:  # rank 0 alone writes
        ctx.folder.write_scores(sums, {"criterion": p.criterion, "seconds": f"{time.perf_counter() - start:.3f}",
                                       "skipped_unreadable": str(data.calibration.skipped)})


def _loss(ctx: Context, loaded: Loaded, criterion: str):
    """The recipe's loss: image-image entropy, or with prune.loss_view image-text the entropy against
    the class prompts' embeddings from the unpruned text tower."""
    from amp_deploy.prune.score import class_embeddings

    p, text = ctx.recipe.prune, None
    if criterion == "entropy" and p.loss_view == "image-text":
        if loaded.encode_text is None or not ctx.data().classes:
            raise UserError("prune.loss_view: image-text needs a CLIP text tower and class folders")
        text = class_embeddings(loaded.encode_text, ctx.data().classes)
    return loss_fn(criterion, loaded.output, p.temperature, text)


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
    loss = _loss(ctx, loaded, "ce" if p.criterion == "ce" else "entropy")

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
    save_pruned(loaded, ctx.folder.rebuilt, search["original_widths"])


def stage_distill(ctx: Context) -> None:
    """Recover what pruning cost: the pruned model learns the original's outputs (distill.epochs > 0)."""
    from amp_deploy.files import hash_file, hash_obj
    from amp_deploy.prune.distill import default_loss, distill

    d, f = ctx.recipe.distill, ctx.folder
    if d.epochs == 0:
        return None
    teacher, student = ctx.original(), load_pruned_model(f.rebuilt)
    images = ctx.distill_images().images
    fingerprint = hash_obj({"distill": ctx.recipe.to_dict()["distill"], "data": ctx.recipe.to_dict()["data"],
                            "rebuilt": hash_file(f.rebuilt)})
    resume = f.read_distill_checkpoint(fingerprint)
    if resume is not None:
        ctx.reporter.log(f"distill: resuming after epoch {resume.epoch} of {d.epochs} (from {f.distill_checkpoint.name})")
    rank, _ = rank_world()

    def save(state) -> None:
        if rank == 0:
            f.write_distill_checkpoint(state, fingerprint)

    start = time.perf_counter()
    loss = default_loss(student.output) if d.loss == "auto" else d.loss
    state = distill(student.model, teacher.model, images, epochs=d.epochs, lr=d.lr, batch_size=d.batch_size,
                    warmup=d.warmup, weight_decay=d.weight_decay, loss=loss, temperature=d.temperature,
                    seed=ctx.recipe.data.seed, device=ctx.device, augment=_augmentation(ctx) if d.augment else None,
                    autocast=ctx.device.type == "cuda", resume=resume,
                    on_epoch=save,
                    on_step=_distill_progress(ctx, len(images), resume.epoch if resume else 0))
    if rank != 0:
        return None  # rank 0 alone writes
    student.model.cpu()
    save_pruned(student, f.pruned, f.read_search()["original_widths"])
    f.write_distill_log({"epochs": d.epochs, "images": len(images), "losses": state.losses,
                         "resumed_after_epoch": resume.epoch if resume else None,
                         "seconds": round(time.perf_counter() - start, 3), "loss": loss, "lr": d.lr})
    f.distill_checkpoint.unlink(missing_ok=True)
    return None


def _augmentation(ctx: Context):
    """What fits the data: one-pixel shifts for digits (as the embedded model was trained), horizontal
    flips for image folders, nothing for synthetic noise."""
    source = ctx.recipe.data.source
    if source == "digits":
        from amp_deploy.digits import shift

        return shift
    if source == "folder":
        return lambda x, gen: torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
    return None


def _distill_progress(ctx: Context, images: int, done_epochs: int):
    """A progress bar over the remaining steps, with epoch, loss and images/s in its description."""
    d = ctx.recipe.distill
    per_epoch = -(-images // d.batch_size)
    advance = ctx.reporter.task("distill", (d.epochs - done_epochs) * per_epoch)
    seen, start, step = [0], time.perf_counter(), [done_epochs * per_epoch]

    def on_step(n: int, loss: float) -> None:
        seen[0] += n
        step[0] += 1
        rate = seen[0] / max(time.perf_counter() - start, 1e-9)
        advance(1, description=f"distill: epoch {-(-step[0] // per_epoch)}/{d.epochs}, loss {loss:.4f}, "
                               f"{rate:.0f} images/s")

    return on_step


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
    Stage("score", ("model", "data", "prune.criterion", "prune.temperature", "prune.loss_view"), lambda f: [f.scores],
          stage_score, parallel=True),
    Stage("search", ("prune",), lambda f: [f.search], stage_search),
    Stage("rebuild", ("distill.epochs",), lambda f: [f.rebuilt], stage_rebuild),
    Stage("distill", ("distill", "data"), lambda f: [f.pruned, f.distill_log] if f.distilled else [], stage_distill,
          parallel=True),
    Stage("export", ("export",), lambda f: [f.onnx("original"), f.onnx("pruned")], stage_export),
    Stage("compile", ("runtimes", "compile"), lambda f: [f.compile_status, *f.engine_files()], stage_compile,
          machine_bound=True),
    Stage("validate", ("validate", "runtimes", "compile"), lambda f: [f.report_json, f.report_md], stage_validate,
          machine_bound=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
PRUNE_STAGES = ("score", "search", "rebuild")
