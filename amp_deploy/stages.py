"""The stages of a build. Each reads its inputs from the output folder and writes atomically.

These are the only functions that read the recipe; they turn it into plain arguments for the
library functions (score, search, rebuild, export, validate).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from amp_deploy._private import atomic_path, first_line, write_json
from amp_deploy.distributed import rank_world
from amp_deploy.families import Loaded
from amp_deploy.pipeline import Context
from amp_deploy.rebuild import apply_widths, load_pruned_model, save_pruned
from amp_deploy.score import loss_fn, magnitude_scores, random_scores, taylor_scores
from amp_deploy.search import adaptive_widths, budget_widths, uniform_widths
from amp_deploy.validate import count_params


def read_scores(out: Path, kind: str = "abs") -> list[torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(out / "scores.safetensors"), framework="pt") as f:
        return [f.get_tensor(f"{kind}.{i}") for i in range(int(f.metadata()["blocks"]))]


def stage_score(ctx: Context) -> None:
    from safetensors.torch import save_file

    p = ctx.recipe.prune
    loaded, data = ctx.original(), ctx.data()
    if p.criterion == "ce" and (data.calibration.labels is None or loaded.output != "logits"):
        from amp_deploy.errors import UserError

        raise UserError("prune.criterion: 'ce' needs labelled data (data.source: digits) and a classifier head")
    start = time.perf_counter()
    rank, world = rank_world()  # across processes, each rank takes every world-th batch
    if p.criterion in ("entropy", "ce"):
        bs = ctx.recipe.data.batch_size
        advance = ctx.task("score: Taylor importance", -(-len(data.calibration.images) // bs))

        def batches():
            for j, b in enumerate(data.calibration.batches(bs)):
                if j % world == rank:
                    yield b
                advance()

        sums = taylor_scores(loaded, batches(), loss_fn(p.criterion, loaded.output, p.temperature),
                             ctx.device, autocast=ctx.device.type == "cuda", checkpointing=p.checkpointing)
    else:
        s = magnitude_scores(loaded) if p.criterion == "magnitude" else random_scores(loaded, ctx.recipe.data.seed)
        sums = {"abs": s, "signed": [t.clone() for t in s]}
    if rank != 0:
        return  # rank 0 alone writes
    tensors = {f"{k}.{i}": t.contiguous() for k, v in sums.items() for i, t in enumerate(v)}
    meta = {"criterion": p.criterion, "blocks": str(len(loaded.sites)),
            "seconds": f"{time.perf_counter() - start:.3f}"}
    with atomic_path(ctx.out / "scores.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def stage_search(ctx: Context) -> None:
    p = ctx.recipe.prune
    scores = read_scores(ctx.out, p.taylor)
    start = time.perf_counter()
    loaded = ctx.original()
    original = loaded.widths()
    result: dict = {"original_widths": original, "search": p.search, "threshold": p.threshold}
    if p.search == "uniform":
        result.update(widths=uniform_widths(original, p.keep_ratio, p.align), block_forwards=0,
                      block_forwards_naive=0)
    else:
        data = ctx.data()
        loss = loss_fn("ce" if p.criterion == "ce" else "entropy", loaded.output, p.temperature)

        def run(target: Loaded, threshold: float, advance=lambda *_: None):
            return adaptive_widths(target, scores, data.validation, ctx.recipe.data.batch_size, loss, threshold,
                                   p.steps, p.align, ctx.device, cached=p.cache, on_block=advance)

        if p.target_params is None:
            advance = ctx.task("search: widths, last block first", len(original))
            res = run(loaded, p.threshold, lambda i, w: advance())
        else:
            budget = int(p.target_params * count_params(loaded.model))
            advance = ctx.task("search: threshold for the parameter budget", None)

            def run_counted(target: Loaded, threshold: float):
                advance()
                return run(target, threshold)

            _, res, threshold, tried = budget_widths(ctx.original, budget, run_counted)
            result.update(threshold=threshold, target_params=p.target_params, budget_params=budget,
                          thresholds_tried=tried, block_forwards_all_thresholds=sum(t[2] for t in tried))
        result.update(widths=res.widths, base_loss=res.base_loss, losses=res.losses,
                      block_forwards=res.block_forwards, block_forwards_naive=res.block_forwards_naive,
                      steps=res.steps)
    result["seconds"] = round(time.perf_counter() - start, 3)
    write_json(ctx.out / "search.json", result)


def stage_rebuild(ctx: Context) -> None:
    loaded = ctx.original()
    scores = read_scores(ctx.out, ctx.recipe.prune.taylor)
    search = json.loads((ctx.out / "search.json").read_text())
    apply_widths(loaded, scores, search["widths"])
    loaded.model.cpu()
    save_pruned(loaded, ctx.out / "pruned.safetensors", search["original_widths"])


def stage_export(ctx: Context) -> None:
    from amp_deploy.export import export_onnx

    e = ctx.recipe.export
    advance = ctx.task("export: ONNX", 2)
    for name, loaded in (("original", ctx.original()), ("pruned", load_pruned_model(ctx.out / "pruned.safetensors"))):
        export_onnx(loaded.model.cpu().float(), ctx.out / f"{name}.onnx", loaded.input_size, e.opset,
                    e.batch.min, e.batch.opt, e.batch.max, e.exporter)
        advance()


def compile_settings(ctx: Context, input_size: tuple[int, int, int]):
    from amp_deploy.tensorrt_engine import BuildSettings

    c, b = ctx.recipe.compile, ctx.recipe.export.batch
    return BuildSettings(c.precision, b.min, b.opt, b.max, tuple(input_size), c.workspace_mib,
                         c.optimization_level, c.strongly_typed)


def stage_compile(ctx: Context) -> None:
    """TensorRT engines for the original and the pruned model, or why there are none."""
    from amp_deploy.runtimes import tensorrt_unavailable_reason

    if "tensorrt" not in ctx.recipe.runtimes:
        status = {"status": "skipped", "reason": "tensorrt is not in the recipe's runtimes"}
    elif reason := tensorrt_unavailable_reason():
        status = {"status": "skipped", "reason": reason}
    else:
        status = _build_engines(ctx)
    write_json(ctx.out / "compile.json", status)


def _build_engines(ctx: Context) -> dict:
    from amp_deploy.export import export_onnx
    from amp_deploy.tensorrt_engine import build_engine

    c, e, out = ctx.recipe.compile, ctx.recipe.export, ctx.out
    engines = {}
    advance = ctx.task("compile: TensorRT engines", 2)
    try:
        for name in ("original", "pruned"):
            loaded = ctx.original() if name == "original" else load_pruned_model(out / "pruned.safetensors")
            settings = compile_settings(ctx, loaded.input_size)
            onnx_path = out / f"{name}.onnx"
            if c.precision != "fp32" and c.strongly_typed:  # the graph carries the precision
                onnx_path = export_onnx(loaded.model.cpu().float(), out / f"{name}.{c.precision}.onnx",
                                        loaded.input_size, e.opset, e.batch.min, e.batch.opt, e.batch.max,
                                        e.exporter, precision=c.precision)
            engines[name] = build_engine(onnx_path, out / f"{name}.plan", settings,
                                         out / "timing.cache" if c.timing_cache else None)
            advance()
    except Exception as err:  # noqa: BLE001 - a failed build is a report row, not a crash
        return {"status": "failed", "reason": f"{type(err).__name__}: {first_line(err, 400)}"}
    return {"status": "ok", "precision": c.precision, "engines": engines}


def stage_validate(ctx: Context) -> None:
    from amp_deploy.errors import GateFailed
    from amp_deploy.report import apply_fidelity_gate, apply_parity_gate, build_report, write_report

    v = ctx.recipe.validate_
    report = build_report(ctx)
    parity = apply_parity_gate(report, v.parity.max_abs_err, v.parity.cosine_min,
                               (v.parity_reduced.max_abs_err, v.parity_reduced.cosine_min))
    fidelity = apply_fidelity_gate(report, v.fidelity.cosine_mean, v.fidelity.top1_agreement, v.fidelity.accuracy_drop)
    write_report(ctx.out, report)  # written first: a failed gate still leaves the evidence
    failed = [f"{gate} gate failed: {'; '.join(breaches)}"
              for gate, breaches in (("parity", parity), ("fidelity", fidelity)) if breaches]
    if failed:
        raise GateFailed("; ".join(failed) + f" (report: {ctx.out / 'report.md'})")
