"""The stages of a build and the stage table. Each reads its inputs from the output folder and
writes its own files atomically.

These are the only functions that read the recipe; they turn it into plain arguments for the
library (prune/, deploy/, measure/).
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from amp_deploy.checkpoint import load_pruned_model, save_pruned
from amp_deploy.data import Split
from amp_deploy.errors import UserError, first_line
from amp_deploy.pipeline.context import Context, Stage, compile_settings
from amp_deploy.pipeline.validate_stage import stage_validate
from amp_deploy.prune.families import Loaded, count_params
from amp_deploy.prune.rebuild import apply_shapes
from amp_deploy.prune.score import (
    DEFAULT_TEMPERATURE,
    TAYLOR_KINDS,
    default_view,
    head_magnitude_scores,
    head_random_scores,
    loss_features,
    loss_fn,
    magnitude_scores,
    random_scores,
    rank_world,
    search_loss_fn,
    taylor_scores,
)
from amp_deploy.prune.search import (
    adaptive_widths,
    budget_widths,
    model_losses,
    smallest_params,
    uniform_check,
    uniform_widths,
    width_grid,
)
from amp_deploy.prune.shape import heads_of, recorded_shapes, shapes_of, to_json


def stage_score(ctx: Context) -> None:
    p = ctx.recipe.prune
    loaded, data = ctx.original(), ctx.data()
    if p.criterion == "ce" and (data.calibration.labels is None or loaded.output != "logits"):
        raise UserError("prune.criterion: 'ce' needs labelled data (data.source: digits) and a classifier head")
    if p.heads:
        require_heads(loaded)
    start = time.perf_counter()
    rank, world = rank_world()  # across processes, each rank takes every world-th batch
    if p.criterion in ("entropy", "ce"):
        bs = ctx.recipe.data.batch_size
        advance = ctx.reporter.task("score: Taylor importance (reading images)", -(-len(data.calibration) // bs) // world)

        def batches():
            for b in data.calibration.batches(bs, rank, world):
                yield b
                advance(1)

        with loss_features(loaded, view_of(ctx, loaded)):
            sums = taylor_scores(loaded, batches(), _loss(ctx, loaded, p.criterion), ctx.device,
                                 autocast=ctx.device.type == "cuda", checkpointing=p.checkpointing)
    else:
        magnitude = p.criterion == "magnitude"
        s = magnitude_scores(loaded) if magnitude else random_scores(loaded, ctx.recipe.data.seed)
        sums = {k: [t.clone() for t in s] for k in TAYLOR_KINDS}
        h = head_magnitude_scores(loaded) if magnitude else head_random_scores(loaded, ctx.recipe.data.seed)
        if h is not None:
            sums.update({f"heads.{k}": [t.clone() for t in h] for k in TAYLOR_KINDS})
    skipped = _summed(data.calibration.skipped if p.criterion in ("entropy", "ce") else 0)
    if rank == 0:  # rank 0 alone writes
        ctx.folder.write_scores(sums, {"criterion": p.criterion, "seconds": f"{time.perf_counter() - start:.3f}",
                                       "skipped_unreadable": str(skipped)})


def _summed(count: int) -> int:
    """A count summed over the processes of a torchrun stage (each rank read its own batches)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    t = torch.tensor(count, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return int(t.item())


def view_of(ctx: Context, loaded: Loaded) -> str:
    """The recipe's loss view; auto: predictions for a classifier head, image-image otherwise."""
    view = ctx.recipe.prune.loss_view
    return default_view(loaded.output) if view == "auto" else view


def temperature_of(ctx: Context, loaded: Loaded) -> float:
    t = ctx.recipe.prune.temperature
    return DEFAULT_TEMPERATURE[view_of(ctx, loaded)] if t is None else t


def _text(ctx: Context, loaded: Loaded):
    """The class prompts' embeddings for the image-text view (None for the other views)."""
    from amp_deploy.prune.score import class_embeddings

    if view_of(ctx, loaded) != "image-text":
        return None
    if loaded.encode_text is None or not ctx.data().classes:
        raise UserError("prune.loss_view: image-text needs a CLIP text tower and class folders")
    return class_embeddings(loaded.encode_text, ctx.data().class_names())


def _loss(ctx: Context, loaded: Loaded, criterion: str):
    """The scoring loss: the entropy in the recipe's view (or ce with labels)."""
    return loss_fn(criterion, view_of(ctx, loaded), temperature_of(ctx, loaded), _text(ctx, loaded))


BUDGET_TOLERANCE = 0.005  # prune.target_params: stop within half a percent of the parameters under the budget


def stage_search(ctx: Context) -> None:
    p = ctx.recipe.prune
    scores = ctx.folder.read_scores(p.taylor)
    start = time.perf_counter()
    loaded = ctx.original()
    original = loaded.widths()
    if all(len(width_grid(h, p.align)) < 2 for h in original):
        raise UserError(f"prune.align: {p.align} is at least every block's MLP width ({max(original)}): no neuron can "
                        f"be removed; choose prune.align below {min(original)}")
    result: dict = {"original_shapes": to_json(loaded.shapes()), "search": p.search, "threshold": p.threshold}
    if p.search == "uniform":
        result.update(shapes=to_json(shapes_of(uniform_widths(original, p.keep_ratio, p.align))), block_forwards=0,
                      block_forwards_naive=0)
    else:
        result.update(_adaptive_search(ctx, loaded, scores))
    result["seconds"] = round(time.perf_counter() - start, 3)
    if rank_world()[0] == 0:  # across processes every rank settled the same widths; rank 0 alone writes
        ctx.folder.write_search(result)


def _adaptive_search(ctx: Context, loaded: Loaded, scores) -> dict:
    """The adaptive search to its budget: a threshold (none), a parameter budget or a latency budget,
    each path in a function of its own; every candidate priced with its re-fit (prune.compensate)."""
    p = ctx.recipe.prune
    criterion = "ce" if p.criterion == "ce" else "entropy"
    loss = search_loss_fn(p.search_loss, criterion, view_of(ctx, loaded), temperature_of(ctx, loaded),
                          _text(ctx, loaded))
    head_scores = _head_scores(ctx, loaded) if p.heads else None
    comp = compensator(ctx, loaded, heads=p.heads)
    if p.target_speedup is not None or p.target_latency_ms is not None:
        out = _latency_search(ctx, loaded, scores, loss, head_scores, comp)
    else:
        run = _adaptive_runner(ctx, scores, loss, head_scores, comp)
        if p.target_params is None:
            out = _threshold_search(ctx, loaded, run)
        else:
            out = _params_search(ctx, loaded, scores, loss, run, comp, criterion)
        out["search_loss"] = p.search_loss if criterion != "ce" else "ce"
    return {**out, "compensation": compensation_log(comp, rows=False)}


def _adaptive_runner(ctx: Context, scores, loss, head_scores, comp):
    """`run(target, threshold, on_block)`: the adaptive bisection of every block of `target`, in place."""
    p, data = ctx.recipe.prune, ctx.data()

    def run(target: Loaded, threshold: float, on_block=None):
        with loss_features(target, view_of(ctx, target)):
            return adaptive_widths(target, scores, data.validation, loss=loss, threshold=threshold,
                                   batch_size=ctx.recipe.data.batch_size, steps=p.steps, align=p.align,
                                   device=ctx.device, cached=p.cache, on_block=on_block, head_scores=head_scores,
                                   comp=comp)

    return run


def _search_record(ctx: Context, res, shapes=None, **extra) -> dict:
    """search.json's account of an adaptive search (`shapes`: what was chosen, when not the search's own)."""
    if res.fell:
        ctx.reporter.log(falling_loss_warning(res.fell))
    out = dict(shapes=to_json(shapes or res.shapes), base_loss=res.base_loss, losses=res.losses,
               block_forwards=res.block_forwards, block_forwards_naive=res.block_forwards_naive, steps=res.steps,
               loss_fell=res.fell, **extra)
    if ctx.recipe.prune.heads:
        out.update(head_steps=res.head_steps)
    return out


def _threshold_search(ctx: Context, loaded: Loaded, run) -> dict:
    """prune.threshold: each block may add this much loss (no budget)."""
    advance = ctx.reporter.task("search: widths, last block first", len(loaded.sites))
    return _search_record(ctx, run(loaded, ctx.recipe.prune.threshold, lambda i, w: advance(1)))


def _params_search(ctx: Context, loaded: Loaded, scores, loss, run, comp, criterion: str) -> dict:
    """prune.target_params: the threshold bisected for the largest model within the budget, then the
    uniform check; whatever is chosen is within the budget, or the build stops with one line."""
    p = ctx.recipe.prune
    total = count_params(loaded.model)
    budget = int(p.target_params * total)
    _budget_reachable(ctx, scores, loaded, budget, total, heads=p.heads)
    advance = ctx.reporter.task("search: threshold for the parameter budget", None)

    def run_counted(target: Loaded, threshold: float):
        advance(1)
        return run(target, threshold)

    pruned, res, threshold, tried = budget_widths(loaded.shared_copy, budget, run_counted,
                                                  tolerance=int(BUDGET_TOLERANCE * total))
    extra = dict(threshold=threshold, target_params=p.target_params, budget_params=budget,
                 thresholds_tried=tried, block_forwards_all_thresholds=sum(t[2] for t in tried))
    if p.uniform_check and (getattr(loss, "reference", False) or criterion == "ce"):  # a level is no departure
        extra["uniform_check"] = _uniform_check(ctx, loaded, pruned, scores, budget, loss, comp)
    check = extra.get("uniform_check", {})
    chosen = check["widths"] if check.get("chosen") == "uniform" else None
    got = check["params"] if chosen else count_params(pruned.model)
    if got > budget:
        raise UserError(f"prune.target_params: {p.target_params:g}: the search found no shapes within "
                        f"{budget:,} parameters (closest {got:,} at threshold {threshold:.3g}); ask for a larger "
                        "budget or prune.search=uniform")
    return _search_record(ctx, res, shapes_of(chosen) if chosen else None, **extra)  # uniform: every head kept


def require_heads(loaded: Loaded) -> None:
    """One line where this model's attention is of no kind whose heads can be cut."""
    from amp_deploy.prune.families import attn_kind_hint

    if loaded.heads() is None:
        raise UserError(f"prune.heads: the attention of {type(loaded.model).__name__} ("
                        f"{attn_kind_hint(loaded.block_list())}) is of no kind whose heads amp-deploy can cut yet "
                        "(timm's Attention and EvaAttention; open_clip's towers; transformers ViT, Dinov2, CLIP, SigLIP); "
                        "set prune.heads=false")


def _head_scores(ctx: Context, loaded: Loaded):
    """The heads' scores for prune.heads; one line where this model's attention cannot be cut."""
    require_heads(loaded)
    got = ctx.folder.read_head_scores(ctx.recipe.prune.taylor)
    if got is None:
        raise UserError("prune.heads: the scores hold no head scores; run `amp-deploy score OUT --force`")
    return got


def _budget_reachable(ctx: Context, scores, loaded: Loaded, budget: int, total: int, heads: bool = False) -> None:
    """Refuse, before any search, a parameter budget under the smallest model pruning can reach
    (every block at its smallest allowed width, and with prune.heads one head: embeddings and the
    head stay)."""
    p = ctx.recipe.prune
    least, floor = smallest_params(loaded.shared_copy, scores, p.align, heads)
    original = loaded.widths()
    if least > budget:
        import math

        also, rest = (" and one attention head per block", "embeddings and norms") if heads else ("", "attention and the rest")
        raise UserError(f"prune.target_params: {p.target_params:g} of {total:,} parameters ({budget:,}) is out of "
                        f"reach: with every MLP at its smallest width ({floor[0]} of {original[0]} neurons, "
                        f"prune.align {p.align}){also} the model keeps {least:,} ({least / total:.3f}); {rest} "
                        f"stay. Ask for prune.target_params >= {math.ceil(least / total * 1000) / 1000:g}")


def _uniform_check(ctx: Context, original: Loaded, pruned: Loaded, scores, budget: int, loss, comp=None) -> dict:
    """The threshold search's model against the same fraction of neurons in every block within the same
    parameter budget, both scored by the search loss on the validation images: the one that departs
    less is kept (the greedy per-block threshold can lose to uniform widths on its own loss at deep
    cuts: DINOv2 ViT-S/14 at 0.6 of its parameters, benchmarks/RESULTS.md)."""
    import contextlib

    def losses(models: list[Loaded]) -> list[float]:
        with contextlib.ExitStack() as stack:
            for m in models:
                m.model.to(ctx.device).eval()
                stack.enter_context(loss_features(m, view_of(ctx, m)))
            return model_losses(models[0], models[1:], ctx.data().validation, loss=loss,
                                batch_size=ctx.recipe.data.batch_size, device=ctx.device)

    got = uniform_check(original, pruned, original.shared_copy, scores, budget, ctx.recipe.prune.align, losses, comp)
    if ctx.recipe.prune.heads:
        got["heads"] = "all"  # the uniform model cuts MLPs only
        ctx.reporter.log("search: the uniform check's model keeps every attention head (it cuts MLP widths only)"
                         + ("" if got["fits"] else f"; at this budget it does not fit ({got['params']:,} parameters "
                                                   f"over {budget:,}), so the search's shapes stay"))
    if got["chosen"] == "uniform":
        ctx.reporter.log(f"search: the same width in every block ({got['widths'][0]} of {original.widths()[0]} "
                         f"neurons) departs less from the original than the threshold search's widths at this budget "
                         f"(search loss {got['loss']:.4g} vs {got['adaptive_loss']:.4g}): kept "
                         "(prune.uniform_check=false keeps the threshold search's)")
    return got


def _latency_search(ctx: Context, loaded: Loaded, scores, loss, head_scores=None, comp=None) -> dict:
    """Widths (and heads, with prune.heads) for prune.target_speedup / target_latency_ms
    (pipeline.speedup), with the loss curves measured by the search's cached evaluator under the
    search loss."""
    from amp_deploy.pipeline.speedup import latency_search
    from amp_deploy.prune.budget import loss_curves

    p, data = ctx.recipe.prune, ctx.data()

    def curves_of(target: Loaded, candidates: list[list[int]], head_candidates: list[list[int]] | None):
        with loss_features(target, view_of(ctx, target)):
            return loss_curves(target, scores, data.validation, candidates, loss=loss,
                               batch_size=ctx.recipe.data.batch_size, device=ctx.device, cached=p.cache,
                               head_scores=head_scores, head_candidates=head_candidates, comp=comp)

    criterion = "ce" if p.criterion == "ce" else p.search_loss
    return {**latency_search(ctx, loaded, scores, curves_of, head_scores), "search_loss": criterion}


def falling_loss_warning(fell: list[dict]) -> str:
    """What to say when the search loss FELL as neurons were removed (the level criterion rewards it)."""
    blocks = ", ".join(f"{f['block']} (width {f['width']}, {f['loss_before']:.4f} -> {f['loss']:.4f})" for f in fell)
    return (f"search: the loss fell as neurons were removed in block {blocks}: those widths were chosen by the "
            "criterion, not by redundancy; prune.search_loss=divergence holds each block to the original instead")


def compensator(ctx: Context, loaded: Loaded, heads: bool):
    """prune.compensate: the re-fit's statistics of the unpruned `loaded` on the calibration images (what
    it fits) and on the validation images (what guards it); None with prune.compensate none. Every rank
    reads every image, so the statistics are alike across processes."""
    from amp_deploy.numerics import fp32_reference
    from amp_deploy.prune.compensate import Compensator, collect

    p, data, bs = ctx.recipe.prune, ctx.data(), ctx.recipe.data.batch_size
    if p.compensate == "none":
        return None
    start = time.perf_counter()
    n = -(-len(data.calibration) // bs) + -(-len(data.validation) // bs)
    advance = ctx.reporter.task("compensate: statistics of the layers a cut re-fits", n)

    def images(split):
        for x, _labels in split.batches(bs):
            yield x
            advance(1)

    loaded.model.eval()
    with fp32_reference():
        fit = collect(loaded, images(data.calibration), ctx.device, heads, p.compensate_tokens, ctx.recipe.data.seed)
        check = collect(loaded, images(data.validation), ctx.device, heads, p.compensate_tokens, ctx.recipe.data.seed)
    comp = Compensator(fit, check, p.compensate, p.compensate_damping)
    comp.statistics_seconds = time.perf_counter() - start
    return comp


def compensation_log(comp, rows: bool = True) -> dict:
    """What a compensator did: compensate.json (every re-fit's errors, `rows`), or in brief for search.json
    (how many re-fits, and the seconds the statistics and the solves cost)."""
    if comp is None:
        return {"mode": "none"}
    summary = comp.summary()
    return {"mode": comp.mode, "damping": comp.damping, "statistics_seconds": round(comp.statistics_seconds, 3),
            "refit_seconds": round(comp.seconds, 3), "declined": sum(r["declined"] for r in summary),
            "refits": summary if rows else len(summary)}


def stage_rebuild(ctx: Context) -> None:
    loaded = ctx.original()
    scores = ctx.folder.read_scores(ctx.recipe.prune.taylor)
    shapes, original = recorded_shapes(ctx.folder.read_search())
    head_scores = ctx.folder.read_head_scores(ctx.recipe.prune.taylor) if heads_of(shapes) else None
    cut = any(s != o for s, o in zip(shapes, original))
    comp = compensator(ctx, loaded, heads=bool(heads_of(shapes))) if cut else None
    apply_shapes(loaded, shapes, scores, head_scores, comp)
    loaded.model.cpu()
    save_pruned(loaded, ctx.folder.rebuilt, original)
    log = compensation_log(comp)
    if comp is None and cut is False:
        log["mode"] = "nothing cut"
    ctx.folder.write_compensate_log(log)
    if log.get("declined"):
        ctx.reporter.log(f"rebuild: {log['declined']} re-fit(s) reconstructed the unpruned output worse on the "
                         "validation images than the weights as cut, and were declined (compensate.json)")


def stage_distill(ctx: Context) -> None:
    """Recover what pruning cost: the pruned model learns the original's outputs (distill.epochs > 0).
    Sharded (distill.sharding), the epoch checkpoints are a torch.distributed.checkpoint folder."""
    from amp_deploy.files import hash_file, hash_obj
    from amp_deploy.pipeline.memory import device_capacity, distill_precision
    from amp_deploy.prune.distill import ShardedCheckpoint, distill, plan_sharding, resolve_loss

    d, f = ctx.recipe.distill, ctx.folder
    if d.epochs == 0:
        return None
    teacher, student = ctx.original(), load_pruned_model(f.rebuilt)
    split = ctx.distill_images()
    images = split.images if isinstance(split, Split) else split  # a stream is read batch by batch
    data_settings = {k: v for k, v in ctx.recipe.to_dict()["data"].items() if k != "workers"}  # same images
    fingerprint = hash_obj({"distill": ctx.recipe.to_dict()["distill"], "data": data_settings,
                            "rebuilt": hash_file(f.rebuilt)})
    rank, world = rank_world()
    precision = distill_precision(d.precision, ctx.device.type)
    plan = plan_sharding(d.sharding, world, student=count_params(student.model), teacher=count_params(teacher.model),
                         precision=precision,
                         capacity=device_capacity(ctx.device.type, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    sharded = plan["sharding"] == "fsdp"
    with _process_group(sharded, ctx.device.type):
        ckpt = ShardedCheckpoint(f.distill_checkpoint_sharded, fingerprint) if sharded else None
        if sharded:
            meta = ckpt.peek()
            resume = None
            done = meta["epoch"] if meta else 0
            probe = meta.get("probe") if meta else None
        else:
            resume = f.read_distill_checkpoint(fingerprint, ctx.reporter.log)
            done = resume.epoch if resume else 0
            probe = resume.probe if resume is not None else None
        if done:
            name = (ckpt.path if sharded else f.distill_checkpoint).name
            ctx.reporter.log(f"distill: resuming after epoch {done} of {d.epochs} (from {name})")
        start = time.perf_counter()
        loss, tokens = resolve_loss(d.loss, student.output)
        train = dict(batch_size=d.batch_size, warmup=d.warmup, weight_decay=d.weight_decay, loss=loss, tokens=tokens,
                     temperature=d.temperature, seed=ctx.recipe.data.seed, device=ctx.device,
                     augment=_augmentation(ctx) if d.augment else None, precision=precision,
                     sharding=plan["sharding"], blocks=student.blocks, checkpointing=d.checkpointing)
        if d.lr == "auto" and probe is None:
            probe = _probe_lr(ctx, student.model, teacher.model, images, train)
        lr = probe["lr"] if d.lr == "auto" else d.lr
        if ckpt is not None:
            ckpt.extra = {"probe": probe}

        def save(state) -> None:
            state.probe = probe
            if rank == 0 and not sharded:
                f.write_distill_checkpoint(state, fingerprint)

        state = distill(student.model, teacher.model, images, epochs=d.epochs, lr=lr, resume=resume, on_epoch=save,
                        on_step=_distill_progress(ctx, len(images), done), checkpoint=ckpt, **train)
    if rank != 0:
        return None  # rank 0 alone writes
    if sharded:  # the student was sharded in place: its gathered weights into a fresh copy of the rebuilt model
        student = load_pruned_model(f.rebuilt)
        student.model.load_state_dict(state.student)
    student.model.cpu()
    save_pruned(student, f.pruned, recorded_shapes(f.read_search())[1])
    skipped = getattr(split, "skipped", 0)  # unreadable files met in the last epoch (every rank reads them all)
    f.write_distill_log({"epochs": d.epochs, "images": len(images), "skipped_unreadable": skipped,
                         "losses": state.losses,
                         "resumed_after_epoch": done or None,
                         "seconds": round(time.perf_counter() - start, 3), "loss": loss, "tokens": tokens, "lr": lr,
                         "lr_setting": d.lr, "lr_probe": probe, "processes": world, "precision": precision,
                         "checkpointing": d.checkpointing, **plan})
    f.distill_checkpoint.unlink(missing_ok=True)
    shutil.rmtree(f.distill_checkpoint_sharded, ignore_errors=True)
    return None


def _process_group(needed: bool, device_type: str):
    """A one-process group for a sharded distillation run without --nproc (FSDP2 needs one); nothing
    when a group exists or none is needed."""
    import contextlib

    import torch.distributed as dist

    if not needed or dist.is_initialized():
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def group():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()

    return group()


def _probe_lr(ctx: Context, student, teacher, images, train: dict) -> dict:
    """distill.lr auto: each candidate rate trains a copy for distill.probe of the run's steps; the
    lowest distillation loss on the validation images (never trained on) chooses the rate."""
    import math

    from amp_deploy.prune.distill import probe_lr

    d = ctx.recipe.distill
    total = d.epochs * math.ceil(len(images) / d.batch_size)
    steps = min(total, max(8, math.ceil(d.probe * total)))
    advance = ctx.reporter.task(f"distill: probing {len(d.lr_candidates)} learning rates, {steps} steps each",
                                len(d.lr_candidates))

    def said(lr: float, loss: float) -> None:
        advance(1)
        ctx.reporter.note(f"distill: lr {lr:g}: validation loss {loss:.5f} after {steps} steps")

    start = time.perf_counter()
    result = probe_lr(student, teacher, images, ctx.data().validation.images, epochs=d.epochs, steps=steps,
                      candidates=tuple(d.lr_candidates), on_rate=said, **train)
    result["seconds"] = round(time.perf_counter() - start, 3)
    ctx.reporter.log(f"distill: learning rate {result['lr']:g} chosen by the probe (distill.lr auto)")
    return result


def _augmentation(ctx: Context):
    """What fits the data: one-pixel shifts for digits (as the embedded model was trained), horizontal
    flips for image folders, nothing for synthetic noise."""
    source = ctx.recipe.data.source
    if source == "digits":
        from amp_deploy.digits import shift

        return shift
    if source == "folder":
        from amp_deploy.prune.distill import hflip

        return hflip
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
    f = ctx.folder
    advance = ctx.reporter.task("export: ONNX" + (" and OpenVINO IR" if f.openvino else ""), 2 * (1 + f.openvino))
    for which, loaded in _models(ctx).items():
        _export(ctx, loaded, which)
        advance(1)
        if f.openvino:  # the same graph as OpenVINO IR (fp32 weights; the precision is chosen at compile time)
            from amp_deploy.deploy.openvino import convert_onnx

            convert_onnx(f.onnx(which), f.ir(which))
            advance(1)


def export_depends(recipe) -> tuple:
    """The export reads the export section; with OpenVINO in the recipe it also writes IR (whichever
    OpenVINO rows, in whatever order)."""
    from amp_deploy.pipeline.context import runs_openvino

    return ("export", ("writes openvino ir", True)) if runs_openvino(recipe) else ("export",)


def runtimes_set(recipe) -> tuple[str, list[str]]:
    """The runtimes as a set (their order in the recipe changes no result)."""
    return ("runtimes (any order)", sorted(recipe.runtimes))


def compile_depends(recipe) -> tuple:
    """Engines are built only with tensorrt among the runtimes: that, and the compile section."""
    return (("builds engines", "tensorrt" in recipe.runtimes), "compile")


def validate_depends(recipe) -> tuple:
    return ("validate", runtimes_set(recipe), "compile")


def stage_quantize(ctx: Context) -> None:
    """INT8/FP8 copies of both exports, calibrated on the first quantize.calibration calibration images."""
    from amp_deploy.deploy import quantize as Q

    q, f = ctx.recipe.quantize, ctx.folder
    log: dict = {"formats": {}}
    if q.formats:
        b = ctx.recipe.export.batch
        reader = Q.CalibrationReader(Q.calibration_batches(ctx.data().calibration.batches(ctx.recipe.data.batch_size),
                                                           q.calibration, b.max))
        log["calibration_images"] = len(reader)
        advance = ctx.reporter.task("quantize: calibrating", 2 * len(q.formats))
        for fmt in q.formats:
            log["formats"][fmt] = {}
            for which in ("original", "pruned"):
                start = time.perf_counter()
                src, dst = f.onnx(which), f.quantized(which, fmt)
                if fmt == "openvino-int8":
                    info = _quantize_openvino(ctx, src, dst, reader)
                else:
                    if fmt == "onnxruntime-int8":
                        info = Q.quantize_onnxruntime(src, dst, reader, method=q.method, per_channel=q.per_channel,
                                                      op_types=q.op_types, preprocess=q.preprocess,
                                                      activation=q.activations)
                    else:
                        info = Q.quantize_modelopt(src, dst, reader, precision=Q.precision_of(fmt))
                    info["coverage"] = Q.matmul_coverage(dst, src)
                    info["coverage_problems"] = Q.coverage_problems(info["coverage"])
                    info["quantized_matmuls"] = Q.quantized_matmuls(info["coverage"])
                info["seconds"] = round(time.perf_counter() - start, 3)
                log["formats"][fmt][which] = info
                advance(1)
    f.write_quantize_log(log)


def _quantize_openvino(ctx: Context, src, dst, reader) -> dict:
    """NNCF's post-training INT8 of one export, as IR; which matrix products run in int8, from the
    compiled model's runtime graph (the rest pinned to f32)."""
    from amp_deploy.deploy import openvino as OV
    from amp_deploy.deploy.quantize import NOTHING_QUANTIZED

    info = OV.quantize_nncf(src, dst, list(reader.batches), model_type=ctx.recipe.quantize.openvino_model_type)
    q = OV.quantized_matmuls(dst)
    info.update(quantized_matmuls=q["quantized"], matmuls=q["matmuls"], execution_precision=q["precisions"],
                coverage_problems=[] if q["quantized"] else [NOTHING_QUANTIZED])
    return info


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
    import dataclasses

    from amp_deploy.deploy.quantize import precision_of, runtime_of
    from amp_deploy.deploy.tensorrt_engine import build_engine

    c, f = ctx.recipe.compile, ctx.folder
    qdq = [fmt for fmt in ctx.recipe.quantize.formats if runtime_of(fmt) == "tensorrt"]
    engines: dict = {}
    quantized: dict = {fmt: {} for fmt in qdq}
    advance = ctx.reporter.task("compile: TensorRT engines", 2 * (1 + len(qdq)))
    cache = f.root if c.timing_cache else None
    try:
        for which, loaded in _models(ctx).items():
            onnx_path = f.onnx(which)
            if c.precision != "fp32" and c.strongly_typed:  # the graph carries the precision
                onnx_path = _export(ctx, loaded, which, c.precision)
            settings = compile_settings(ctx, loaded.input_size)
            engines[which] = build_engine(onnx_path, f.plan(which), settings, cache)
            advance(1)
            for fmt in qdq:  # Q/DQ graphs: strongly typed, the precision is in the graph
                fp8_capable(fmt)
                q_settings = dataclasses.replace(settings, precision=precision_of(fmt), strongly_typed=True)
                quantized[fmt][which] = build_engine(f.quantized(which, fmt), f.plan(which, fmt), q_settings, cache)
                advance(1)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a failed build is a report row, not a crash
        return {"status": "failed", "reason": f"{type(err).__name__}: {first_line(err, 400)}"}
    return {"status": "ok", "precision": c.precision, "engines": engines, "quantized": quantized}


def fp8_capable(fmt: str) -> None:
    """FP8 engines need compute capability 8.9 or later: a UserError on an older GPU."""
    from amp_deploy.deploy.quantize import FP8_MIN_CAPABILITY, precision_of

    if precision_of(fmt) != "fp8" or not torch.cuda.is_available():
        return
    cap = torch.cuda.get_device_capability()
    if cap < FP8_MIN_CAPABILITY:
        raise UserError(f"quantize.formats: {fmt} needs a GPU with compute capability >= "
                        f"{'.'.join(map(str, FP8_MIN_CAPABILITY))} (FP8 tensor cores); "
                        f"{torch.cuda.get_device_name()} has {cap[0]}.{cap[1]}")


def latency_budget(recipe) -> bool:
    """A search to a latency budget measures this machine: its widths belong to it."""
    return recipe.prune.target_speedup is not None or recipe.prune.target_latency_ms is not None


def quantizes_for_this_cpu(recipe) -> bool:
    """ONNX Runtime INT8 is made for this CPU (7-bit weights where it has no VNNI, deploy.quantize):
    those files belong to the machine."""
    return any(fmt.startswith("onnxruntime-") for fmt in recipe.quantize.formats)


SCORE_ONLY = ("checkpointing",)  # prune keys the search never reads (recomputation while scoring: same scores)


def search_depends(recipe) -> tuple:
    """The prune settings the search reads (not prune.checkpointing, a scoring setting; prune.latency only
    for a latency budget); to a latency budget, also the settings its latency table is measured with (the
    exported graph, its quantization and engines, the runtimes, the timing threads)."""
    timed = latency_budget(recipe)
    keys = tuple(f"prune.{k}" for k in type(recipe.prune).model_fields
                 if k not in SCORE_ONLY and (timed or k != "latency"))
    return (*keys, "export", "quantize", "compile", runtimes_set(recipe), "validate.threads", "validate.warmup") \
        if timed else keys


STAGES: tuple[Stage, ...] = (
    Stage("score", ("model", "data", "prune.criterion", "prune.temperature", "prune.loss_view"),
          lambda f: [f.scores], stage_score, parallel=True,
          reads=("model.pretrained", "data.path", "data.class_names"), device_bound=True),
    Stage("search", search_depends, lambda f: [f.search], stage_search, machine_bound=latency_budget, device_bound=True,
          parallel=True),
    Stage("rebuild", ("distill.epochs", "prune.compensate", "prune.compensate_damping", "prune.compensate_tokens"),
          lambda f: [f.rebuilt, f.compensate_log], stage_rebuild, device_bound=True),
    Stage("distill", ("distill", "data"), lambda f: [f.pruned, f.distill_log] if f.distilled else [], stage_distill,
          parallel=True, reads=("distill.path",), device_bound=True),
    Stage("export", export_depends, lambda f: [f.onnx("original"), f.onnx("pruned"), *f.ir_files()], stage_export),
    Stage("quantize", ("quantize",), lambda f: [f.quantize_log, *f.quantized_files(list(f.read_quantize_log().get(
        "formats", {})))], stage_quantize, machine_bound=quantizes_for_this_cpu),
    Stage("compile", compile_depends, lambda f: [f.compile_status, *f.engine_files()], stage_compile,
          machine_bound=True),
    Stage("validate", validate_depends, lambda f: [f.report_json, f.report_md], stage_validate,
          machine_bound=True, device_bound=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
PRUNE_STAGES = ("score", "search", "rebuild")
