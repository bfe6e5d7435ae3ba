"""The validate stage: measure every runtime of the recipe, assemble report.json, apply the gates.

The measuring is `measure.validation` (plain arguments); this module knows the recipe and the
folder: which runner each runtime name makes from which file, and what goes into the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from amp_deploy.checkpoint import load_pruned_model
from amp_deploy.deploy.runtimes import Runner
from amp_deploy.deploy.session_memory import SessionSpec
from amp_deploy.errors import GateFailed, GateUndecided, UserError
from amp_deploy.measure import metrics as M
from amp_deploy.measure.report import (
    SCHEMA,
    apply_fidelity_gate,
    apply_parity_gate,
    apply_quantization_gate,
    environment,
)
from amp_deploy.measure.validation import fidelity, runtime_row
from amp_deploy.pipeline.context import Context
from amp_deploy.prune.families import count_params
from amp_deploy.prune.shape import report_section


def _runner_factories(ctx: Context, models: dict[str, torch.nn.Module],
                      input_size: tuple[int, ...]) -> dict[str, tuple[Callable[[str], Runner], str]]:
    """Per runtime name: a function that makes the runner of "original" or "pruned", and its precision."""
    from amp_deploy.deploy import runtimes as R

    v, f, c = ctx.recipe.validate_, ctx.folder, ctx.recipe.compile
    b = ctx.recipe.export.batch
    trt_profile = tuple([n, *input_size] for n in (b.min, b.opt, b.max))
    # ONNX Runtime's TensorRT provider runs "fp32" with TF32 on (it has no switch), so its fp32 row is
    # judged with the reduced tolerances too.
    ort_trt_precision = "fp16" if c.precision == "fp16" else "tf32"
    return {
        "onnxruntime": (_cpu_runner(ctx, "onnxruntime"), "fp32"),
        "onnxruntime-cuda": (lambda k: R.onnxruntime_runner(f.onnx(k), v.threads, R.cuda_providers()), "fp32"),
        "onnxruntime-trt": (lambda k: R.onnxruntime_runner(
            f.onnx(k), v.threads, R.tensorrt_providers(f.ort_trt_cache, f.onnx(k), c.precision == "fp16", trt_profile)),
            ort_trt_precision),
        "tensorrt": (lambda k: R.tensorrt_runner(f.plan(k)), c.precision),
        "torch": (lambda k: R.torch_runner(models[k], v.threads, ctx.device), "fp32"),
        "torch-compile": (lambda k: R.torch_runner(torch.compile(models[k]), v.threads, ctx.device), "fp32"),
        **{name: (_cpu_runner(ctx, name), prec) for name, prec in R.OPENVINO_RUNTIMES.items()},
        **_quantized_factories(ctx),
    }


def quantized_rows(formats: list[str]) -> dict[str, str]:
    """Report row name -> quantization format: each format on its runtime, and a TensorRT Q/DQ model
    also on ONNX Runtime's CPU provider (its fidelity, measurable without a GPU)."""
    rows = {}
    for fmt in formats:
        rows[fmt] = fmt
        if fmt.startswith("tensorrt-"):
            rows[f"{fmt}-on-onnxruntime"] = fmt
    return rows


def _engine_row(name: str) -> bool:
    """A row that runs TensorRT engines (fp16/bf16/fp32 or a Q/DQ format), built by the compile stage."""
    return name == "tensorrt" or (name.startswith("tensorrt-") and not name.endswith("-on-onnxruntime"))


def _quantized_factories(ctx: Context) -> dict[str, tuple[Callable[[str], Runner], str]]:
    from amp_deploy.deploy import runtimes as R
    from amp_deploy.deploy.quantize import precision_of

    f = ctx.folder
    out = {}
    for name, fmt in quantized_rows(ctx.recipe.quantize.formats).items():
        if _engine_row(name):
            make = (lambda fmt: lambda k: R.tensorrt_runner(f.plan(k, fmt)))(fmt)
        elif precision_of(fmt) == "fp8":
            make = _no_fp8_on_cpu
        else:
            make = _cpu_runner(ctx, name)
        out[name] = (make, precision_of(fmt))
    return out


def _cpu_runner(ctx: Context, name: str) -> Callable[[str], Runner]:
    """The runner of a CPU row on its file, opened as its host memory is measured (`_session_spec`)."""
    from amp_deploy.deploy.session_memory import open_runner

    spec = _session_spec(ctx, name)
    return lambda k: open_runner(spec(k))


def _no_fp8_on_cpu(which: str) -> Runner:
    from amp_deploy.deploy.runtimes import Unavailable

    raise Unavailable("not run: ONNX Runtime's CPU provider has no float8 kernels (it refuses the FP8 Q/DQ graph); "
                      "FP8 fidelity is measured on the tensorrt-fp8 row, on a GPU of compute capability 8.9 or later")


def _quantize_section(ctx: Context) -> dict[str, Any] | None:
    """What the quantize stage did, per format and model (without the per-block coverage detail)."""
    q = ctx.recipe.quantize
    if not q.formats:
        return None
    log = ctx.folder.read_quantize_log()
    formats = {fmt: {k: {key: val for key, val in info.items() if key != "coverage"} for k, info in per.items()}
               for fmt, per in log.get("formats", {}).items()}
    return {"calibration_images": log.get("calibration_images"), "formats": formats}


def _weights_bytes(ctx: Context, name: str, models: dict[str, torch.nn.Module]) -> Callable[[str], int]:
    from amp_deploy.deploy.export import external_files
    from amp_deploy.deploy.openvino import ir_files

    f = ctx.folder
    fmt = quantized_rows(ctx.recipe.quantize.formats).get(name)
    if fmt is not None:
        if _engine_row(name):
            return lambda k: f.plan(k, fmt).stat().st_size
        if fmt.startswith("openvino-"):
            return lambda k: sum(p.stat().st_size for p in ir_files(f.quantized(k, fmt)))
        return lambda k: f.quantized(k, fmt).stat().st_size
    if name.startswith("openvino"):
        return lambda k: sum(p.stat().st_size for p in ir_files(f.ir(k)))
    if name == "tensorrt":
        return lambda k: f.plan(k).stat().st_size
    if name.startswith("torch"):
        return lambda k: sum(p.numel() * p.element_size() for p in models[k].parameters())
    return lambda k: sum(p.stat().st_size for p in [f.onnx(k), *external_files(f.onnx(k))])


def _row(ctx: Context, name: str, models: dict, holdout, refs: dict, output: str) -> dict[str, Any]:
    """One runtime's report row (a skipped compile stage's status stands for the tensorrt rows)."""
    quantized = name in quantized_rows(ctx.recipe.quantize.formats)
    if _engine_row(name):
        compiled = ctx.folder.read_compile_status()
        if compiled["status"] != "ok":
            return compiled
    v, b = ctx.recipe.validate_, ctx.recipe.export.batch
    make, precision = _runner_factories(ctx, models, tuple(holdout.images.shape[1:]))[name]
    advance = ctx.reporter.task(f"validate: {name} latency", len(v.batch_sizes))
    extra = _quantized_fidelity(ctx, holdout.labels, refs, output) if quantized else None
    return runtime_row(make, precision=precision, holdout=holdout.images, refs=refs, batch_sizes=v.batch_sizes,
                       batch_range=(b.min, b.max), warmup=v.warmup, iterations=v.iterations,
                       warmup_seconds=v.warmup_seconds, parity=name != "torch",
                       weights_bytes=_weights_bytes(ctx, name, models), on_batch=lambda: advance(1), extra=extra,
                       session=_session_spec(ctx, name))


def _session_spec(ctx: Context, name: str) -> Callable[[str], SessionSpec] | None:
    """Which file this row's CPU session opens, and how (a fresh process measuring its host memory
    opens it the same way): ONNX Runtime and OpenVINO rows, fp32 and quantized (OpenVINO INT8: its
    int8 products, everything else pinned to f32). None for torch (its model lives in this process),
    the GPU rows (their figure is device memory) and FP8 (no CPU kernels)."""
    from amp_deploy.deploy.quantize import precision_of
    from amp_deploy.deploy.runtimes import OPENVINO_RUNTIMES

    f, threads = ctx.folder, ctx.recipe.validate_.threads
    fmt = quantized_rows(ctx.recipe.quantize.formats).get(name)
    if name == "onnxruntime":
        return lambda k: SessionSpec("onnxruntime", str(f.onnx(k)), threads)
    if name in OPENVINO_RUNTIMES:
        return lambda k: SessionSpec("openvino", str(f.ir(k)), threads, OPENVINO_RUNTIMES[name])
    if fmt is None or _engine_row(name) or precision_of(fmt) == "fp8":
        return None
    if fmt.startswith("openvino-"):
        return lambda k: SessionSpec("openvino", str(f.quantized(k, fmt)), threads, "fp32")
    return lambda k: SessionSpec("onnxruntime", str(f.quantized(k, fmt)), threads)


def _quantized_fidelity(ctx: Context, labels, refs: dict, output: str):
    """A quantized row's fidelity against the original fp32 model, k-NN top-1 included for an
    embedding model (its bank: the calibration images through the same quantized runner)."""
    from amp_deploy.measure.validation import RunnerModel, quantized_fidelity

    b, data = ctx.recipe.export.batch, ctx.data()

    def extra(runners: dict[str, Runner], outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        fid = quantized_fidelity(outputs, refs["original"], labels, output)
        if output == "embedding" and labels is not None:
            for k, r in runners.items():
                bank, bank_labels = M.predict_labelled(RunnerModel(r, (b.min, b.max)), data.calibration,
                                                       ctx.recipe.data.batch_size, torch.device("cpu"))
                if bank_labels is not None:
                    fid[k]["knn_top1"] = M.knn_top1(bank, bank_labels, outputs[k], labels)
        return fid

    return extra


def build_report(ctx: Context) -> dict[str, Any]:
    """Measure everything the recipe asks for and assemble report.json's dict."""
    r, f = ctx.recipe, ctx.folder
    original = ctx.original()
    pruned = load_pruned_model(f.pruned)
    search = f.read_search()
    data = ctx.data()
    holdout = data.holdout
    models = {"original": original.model.cpu().eval(), "pruned": pruned.model.cpu().eval()}
    # fp32 references on the CPU: the ONNX files were exported from exactly these models.
    refs = {k: M.predict(m, holdout, r.data.batch_size, torch.device("cpu")) for k, m in models.items()}
    fid = fidelity(refs["original"], refs["pruned"], holdout.labels, original.output)
    before = ref_before = None
    if f.distilled:  # the price of pruning alone, before distillation won some of it back
        before = load_pruned_model(f.rebuilt).model.cpu().eval()
        ref_before = M.predict(before, holdout, r.data.batch_size, torch.device("cpu"))
        fid["before_distill"] = fidelity(refs["original"], ref_before, holdout.labels, original.output)
        del fid["before_distill"]["cosines"]
    if original.output == "embedding" and holdout.labels is not None:
        measures, measures_before = _embedding_measures(ctx, original, models, refs, holdout.labels, before, ref_before)
        fid.update(measures)
        if measures_before:
            fid["before_distill"].update(measures_before)  # k-NN (and zero-shot) top-1 of the pruned model alone
    params = {k: count_params(m) for k, m in models.items()}
    flops = {k: M.count_flops(m, original.input_size) for k, m in models.items()}
    runtimes = {name: _row(ctx, name, models, holdout, refs, original.output)
                for name in [*r.runtimes, *quantized_rows(r.quantize.formats)]}
    return {
        "schema": SCHEMA,
        "name": r.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {**original.spec, "output": original.output, "input_size": list(original.input_size)},
        "params": {**params, "ratio": params["pruned"] / params["original"]},
        "flops": {**flops, "ratio": flops["pruned"] / flops["original"]},
        **report_section(original.shapes(), pruned.shapes()),  # report.json's widths and heads
        "prune": _prune_section(ctx, search),
        "fidelity": fid,
        "distill": f.read_distill_log() if f.distilled else None,
        "data": {"source": r.data.source, "calibration": len(data.calibration),
                 "validation": len(data.validation), "holdout": len(holdout), "classes": data.classes,
                 "skipped_unreadable": data.skipped + int(f.scores_meta().get("skipped_unreadable", 0)),
                 "skipped_unreadable_distill": (f.read_distill_log().get("skipped_unreadable", 0)
                                                if f.distilled else None)},
        "runtimes": runtimes,
        "latency_budget": latency_budget_section(search.get("latency_budget"), runtimes),
        "quantize": _quantize_section(ctx),
        "environment": environment(str(ctx.device)),
        "validate_settings": {"warmup": r.validate_.warmup, "warmup_seconds": r.validate_.warmup_seconds,
                              "iterations": r.validate_.iterations,
                              "threads": r.validate_.threads, "batch_sizes": r.validate_.batch_sizes},
    }


def _embedding_measures(ctx: Context, original, models: dict, refs: dict, labels: torch.Tensor,
                        before: torch.nn.Module | None = None, ref_before: torch.Tensor | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """k-NN top-1 against the calibration images' features; zero-shot top-1 for CLIP models. With
    `before` (the pruned model before distillation) the same measures for it, in a second dict."""
    from amp_deploy.measure.validation import embedding_fidelity
    from amp_deploy.prune.score import class_embeddings

    data, bs = ctx.data(), ctx.recipe.data.batch_size
    feats = {k: M.predict_labelled(m, data.calibration, bs, torch.device("cpu")) for k, m in models.items()}
    emb, why = None, None
    if original.encode_text and data.classes:
        try:
            emb = class_embeddings(original.encode_text, data.class_names())
        except UserError as e:  # no readable names: zero-shot is not measured, and the report says why
            why = f"zero-shot top-1 not measured: {e}"
            ctx.reporter.log(why)
    out = embedding_fidelity(refs, labels, {k: v[0] for k, v in feats.items()}, feats["original"][1], emb)
    out_before = None
    if before is not None and ref_before is not None:
        bank = M.predict_labelled(before, data.calibration, bs, torch.device("cpu"))[0]
        out_before = embedding_fidelity({**refs, "pruned": ref_before}, labels,
                                        {"original": feats["original"][0], "pruned": bank}, feats["original"][1], emb)
        out_before = {k: v["pruned"] for k, v in out_before.items()}  # the original's figures are above
    if why:
        out["zero_shot_top1"] = {"status": "not measured", "reason": why}
    return out, out_before


def budget_row(budget: dict, runtimes: dict[str, Any]) -> str | None:
    """The report row that runs the budget's runtime in its precision (None when validate has none)."""
    for name in (f"{budget['runtime']}-{budget['precision']}", budget["runtime"]):  # openvino-bf16, onnxruntime
        row = runtimes.get(name)
        if row is not None and row.get("precision", "fp32") == budget["precision"]:
            return name
    return None


def latency_budget_section(budget: dict | None, runtimes: dict[str, Any]) -> dict[str, Any] | None:
    """The search's latency budget (target, predicted, measured by the search) and validate's own
    measurement of the same runtime, precision and batch: the median over rounds of the per-round
    ratio original / pruned (the two are interleaved)."""
    if not budget:
        return None
    out = {k: v for k, v in budget.items() if k != "curves"}
    name, b = budget_row(budget, runtimes), str(budget["batch"])
    out["validate"] = {"status": "not measured", "reason": f"no report row runs {budget['runtime']} in "
                       f"{budget['precision']}"}
    if name is not None:
        row = runtimes[name]
        if row.get("status") != "ok":
            out["validate"] = {"row": name, "status": row.get("status"), "reason": row.get("reason")}
        elif b not in row["latency_ms"]["original"]:
            out["validate"] = {"row": name, "status": "not measured",
                               "reason": f"batch {b} is not in validate.batch_sizes"}
        else:
            o, q = (row["latency_ms"][k][b]["samples"] for k in ("original", "pruned"))
            out["validate"] = {"row": name, "status": "ok", "measured_speedup": M.median_ratio(o, q),
                               "p50_speedup": row["latency_ms"]["original"][b]["p50"] / row["latency_ms"]["pruned"][b]["p50"]}
            if budget.get("baseline") == "fp32":
                out["validate"] = _over_fp32(budget, runtimes, out["validate"], b)
    return out


def _over_fp32(budget: dict, runtimes: dict[str, Any], seen: dict, b: str) -> dict:
    """Validate's speedup for `prune.latency.baseline: fp32`: the pruned model in the budget's
    precision against the original on the same runtime's fp32 row. The two rows are timed in loops of
    their own, so this is the ratio of their p50s (each row's own interleaved ratio stays beside it)."""
    fp32 = budget_row({**budget, "precision": "fp32"}, runtimes)
    row = runtimes.get(fp32) if fp32 else None
    if row is None or row.get("status") != "ok" or b not in row["latency_ms"]["original"]:
        return {**seen, "status": "not measured", "reason": f"no {budget['runtime']} fp32 row at batch {b} to time "
                "the original in fp32 (add it to runtimes)"}
    pruned = runtimes[seen["row"]]["latency_ms"]["pruned"][b]["p50"]
    return {**seen, "same_precision_speedup": seen["measured_speedup"], "baseline_row": fp32,
            "measured_speedup": row["latency_ms"]["original"][b]["p50"] / pruned,
            "how": f"p50 of the original on {fp32} over the pruned model's p50 on {seen['row']} (two loops)"}


def _prune_section(ctx: Context, search: dict) -> dict[str, Any]:
    p = ctx.recipe.prune
    return {
        "criterion": p.criterion, "search": p.search, "threshold": search["threshold"],
        "target_params": p.target_params, "target_speedup": p.target_speedup,
        "target_latency_ms": p.target_latency_ms, "taylor": p.taylor, "align": p.align, "cached_search": p.cache,
        "seconds": round(ctx.folder.stage_seconds("score") + search["seconds"], 3),  # wall time of score + search
        "block_forwards": search["block_forwards"],
        "block_forwards_naive": search["block_forwards_naive"],
        # budget mode: the final search's count above; every threshold tried together here
        "block_forwards_all_thresholds": search.get("block_forwards_all_thresholds"),
        "base_loss": search.get("base_loss"), "final_loss": (search.get("losses") or [None])[-1],
        "uniform_check": search.get("uniform_check"),
    }


def failed_rows(ctx: Context, report: dict[str, Any]) -> list[str]:
    """Each requested row that failed to load or run (validate.may_fail excepted): what failed, the
    files it read and the runtime's own reason (a CI build whose OpenVINO model cannot load fails)."""
    out = []
    for name, row in report["runtimes"].items():
        if row.get("status") != "failed" or name in ctx.recipe.validate_.may_fail:
            continue
        spec = _session_spec(ctx, name)
        files = f" ({spec('original').path}, {spec('pruned').path})" if spec is not None else ""
        out.append(f"runtime '{name}' failed{files}: {row.get('reason')} (validate.may_fail: [{name}] reports it "
                   "without failing the build)")
    return out


def stage_validate(ctx: Context) -> None:
    v = ctx.recipe.validate_
    report = build_report(ctx)
    parity = apply_parity_gate(report, v.parity.max_abs_err, v.parity.cosine_min,
                               (v.parity_reduced.max_abs_err, v.parity_reduced.cosine_min),
                               (v.parity_bf16.max_abs_err, v.parity_bf16.cosine_min, v.parity_bf16.cosine_mean))
    fid, undecided = apply_fidelity_gate(report, v.fidelity.cosine_mean, v.fidelity.top1_agreement,
                                         v.fidelity.accuracy_drop)
    quant = apply_quantization_gate(report, {"int8": v.parity_int8.model_dump(), "fp8": v.parity_fp8.model_dump()})
    ctx.folder.write_report(report)  # written first: a failed gate still leaves the evidence
    failed = [f"{gate} gate failed: {'; '.join(breaches)}"
              for gate, breaches in (("parity", parity), ("fidelity", fid), ("quantization", quant)) if breaches]
    failed += failed_rows(ctx, report)
    if failed:
        raise GateFailed("; ".join(failed) + f" (report: {ctx.folder.report_md})")
    if undecided:
        raise GateUndecided("fidelity gate could not judge: " + "; ".join(undecided) + f" (report: {ctx.folder.report_md})")
