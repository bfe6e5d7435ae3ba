"""The stages of a build. Each reads its inputs from the output folder and writes atomically.

These are the only functions that read the recipe; they turn it into plain arguments for the
library functions (score, search, rebuild, export, validate).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from amp_deploy._private import atomic_path, write_json
from amp_deploy.pipeline import Context
from amp_deploy.rebuild import apply_widths, load_pruned_model, save_pruned
from amp_deploy.score import loss_fn, magnitude_scores, random_scores, taylor_scores
from amp_deploy.search import adaptive_widths, uniform_widths


def read_scores(out: Path) -> tuple[list[torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(out / "scores.safetensors"), framework="pt") as f:
        meta = f.metadata()
        n = int(meta["blocks"])
        return [f.get_tensor(f"abs.{i}") for i in range(n)], meta


def stage_score(ctx: Context) -> None:
    from safetensors.torch import save_file

    p = ctx.recipe.prune
    loaded, data = ctx.original(), ctx.data()
    if p.criterion == "ce" and (data.calibration.labels is None or loaded.output != "logits"):
        from amp_deploy.errors import UserError

        raise UserError("prune.criterion: 'ce' needs labelled data (data.source: digits) and a classifier head")
    start = time.perf_counter()
    if p.criterion in ("entropy", "ce"):
        bs = ctx.recipe.data.batch_size
        advance = ctx.task("score: Taylor importance", -(-len(data.calibration.images) // bs))

        def batches():
            for b in data.calibration.batches(bs):
                yield b
                advance()

        sums = taylor_scores(loaded, batches(), loss_fn(p.criterion, loaded.output, p.temperature),
                             ctx.device, autocast=ctx.device.type == "cuda")
    else:
        s = magnitude_scores(loaded) if p.criterion == "magnitude" else random_scores(loaded, ctx.recipe.data.seed)
        sums = {"abs": s, "signed": s}
    tensors = {f"{k}.{i}": t.contiguous() for k, v in sums.items() for i, t in enumerate(v)}
    meta = {"criterion": p.criterion, "blocks": str(len(loaded.sites)),
            "seconds": f"{time.perf_counter() - start:.3f}"}
    with atomic_path(ctx.out / "scores.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def stage_search(ctx: Context) -> None:
    p = ctx.recipe.prune
    loaded = ctx.original()
    scores, _ = read_scores(ctx.out)
    original = loaded.widths()
    start = time.perf_counter()
    result: dict = {"original_widths": original, "search": p.search}
    if p.search == "uniform":
        result.update(widths=uniform_widths(original, p.keep_ratio, p.align), block_forwards=0,
                      block_forwards_naive=0)
    else:
        data = ctx.data()
        advance = ctx.task("search: widths, last block first", len(original))
        res = adaptive_widths(loaded, scores, data.validation, ctx.recipe.data.batch_size,
                              loss_fn("entropy" if p.criterion != "ce" else "ce", loaded.output, p.temperature),
                              p.threshold, p.steps, p.align, ctx.device, cached=p.cache,
                              on_block=lambda i, w: advance())
        result.update(widths=res.widths, base_loss=res.base_loss, losses=res.losses,
                      block_forwards=res.block_forwards, block_forwards_naive=res.block_forwards_naive,
                      steps=res.steps)
    result["seconds"] = round(time.perf_counter() - start, 3)
    write_json(ctx.out / "search.json", result)


def stage_rebuild(ctx: Context) -> None:
    loaded = ctx.original()
    scores, _ = read_scores(ctx.out)
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


def stage_compile(ctx: Context) -> None:
    from amp_deploy.runtimes import tensorrt_unavailable_reason

    if "tensorrt" not in ctx.recipe.runtimes:
        status = {"status": "skipped", "reason": "tensorrt is not in the recipe's runtimes"}
    else:
        reason = tensorrt_unavailable_reason()
        status = {"status": "skipped", "reason": reason or
                  "the TensorRT compile stage is not implemented yet; no engine was built"}
    write_json(ctx.out / "compile.json", status)


def stage_validate(ctx: Context) -> None:
    from amp_deploy.errors import GateFailed
    from amp_deploy.report import apply_parity_gate, build_report, write_report

    gate = ctx.recipe.validate_.parity
    report = build_report(ctx)
    breaches = apply_parity_gate(report, gate.max_abs_err, gate.cosine_min)
    write_report(ctx.out, report)  # written first: a failed gate still leaves the evidence
    if breaches:
        raise GateFailed("parity gate failed: " + "; ".join(breaches))
