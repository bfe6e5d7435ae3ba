"""report.json (keys that scripts read, see DESIGN.md) and report.md (what a person reads)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from amp_deploy import validate as V
from amp_deploy._private import first_line, write_json, write_text
from amp_deploy.errors import UserError
from amp_deploy.export import external_files
from amp_deploy.pipeline import Context
from amp_deploy.rebuild import load_pruned_model
from amp_deploy.runtimes import (
    Unavailable,
    cuda_providers,
    onnxruntime_runner,
    tensorrt_providers,
    tensorrt_runner,
    torch_runner,
)

SCHEMA = "amp-deploy.report/1"


def _factories(ctx: Context, torch_models: dict) -> dict[str, tuple[Callable[[str], Any], str]]:
    """Per runtime: a function that makes the runner for "original" or "pruned", and its precision."""
    v, out, c = ctx.recipe.validate_, ctx.out, ctx.recipe.compile
    trt_prec = c.precision

    def compiled(k: str):
        import torch as t

        return torch_runner(t.compile(torch_models[k]), v.threads, ctx.device)

    return {
        "onnxruntime": (lambda k: onnxruntime_runner(out / f"{k}.onnx", v.threads), "fp32"),
        "onnxruntime-cuda": (lambda k: onnxruntime_runner(out / f"{k}.onnx", v.threads, cuda_providers()), "fp32"),
        "onnxruntime-trt": (lambda k: onnxruntime_runner(out / f"{k}.onnx", v.threads,
                                                         tensorrt_providers(out / "ort_trt_cache", trt_prec == "fp16")),
                            "fp16" if trt_prec == "fp16" else "fp32"),
        "tensorrt": (lambda k: tensorrt_runner(out / f"{k}.plan"), trt_prec),
        "torch": (lambda k: torch_runner(torch_models[k], v.threads, ctx.device), "fp32"),
        "torch-compile": (compiled, "fp32"),
    }


def _runtime_row(ctx: Context, name: str, torch_models: dict, holdout: torch.Tensor,
                 refs: dict[str, torch.Tensor]) -> dict[str, Any]:
    v, out = ctx.recipe.validate_, ctx.out
    if name == "tensorrt":
        compiled = json.loads((out / "compile.json").read_text())
        if compiled["status"] != "ok":
            return compiled
    factory, precision = _factories(ctx, torch_models)[name]
    largest = V.batch_of(holdout, max(v.batch_sizes))

    def make(k: str):
        """The runner, warmed by one run at the largest batch, and the host memory that took."""
        def create():
            r = factory(k)
            r.run(largest)
            return r
        return V.host_peak(create)

    runners, host_peak, device_peak = {}, {}, {}
    try:
        make("pruned")  # a throwaway first session: one-time library set-up is nobody's peak
        for k in ("original", "pruned"):
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runners[k], host_peak[k] = make(k)
            if name == "tensorrt":
                device_peak[k] = runners[k].info["device_memory_bytes"]
            elif ctx.device.type == "cuda" and name.startswith("torch"):
                device_peak[k] = torch.cuda.max_memory_allocated()
    except Unavailable as e:
        return {"status": "skipped", "reason": str(e)}
    except UserError as e:
        return {"status": "failed", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a runtime that breaks is a report row, not a crash
        return {"status": "failed", "reason": f"{type(e).__name__}: {first_line(e, 400)}"}
    row: dict[str, Any] = {"status": "ok", "precision": precision, "settings": runners["original"].info}
    if name != "torch":  # the eager torch row *is* the reference: parity with itself proves nothing
        row["parity"] = _parity(runners, holdout, refs, ctx.recipe.export.batch.max)
    row["latency_ms"] = {"original": {}, "pruned": {}}
    advance = ctx.task(f"validate: {name} latency", len(v.batch_sizes))
    for b in v.batch_sizes:
        stats = V.latency(runners, V.batch_of(holdout, b), v.warmup, v.iterations, v.warmup_seconds)
        for k in stats:
            row["latency_ms"][k][str(b)] = stats[k]
        advance()
    unstable = [f"{k} batch {b}: CV {st['cv']:.1%}" for k in ("original", "pruned")
                for b, st in row["latency_ms"][k].items() if st["cv"] > 0.025]
    if unstable:  # trtexec's threshold: timings this noisy compare poorly across builds
        row["warnings"] = [f"unstable timing (coefficient of variation above 2.5%): {', '.join(unstable)}"]
    row["speedup"] = {str(b): row["latency_ms"]["original"][str(b)]["p50"] / row["latency_ms"]["pruned"][str(b)]["p50"]
                      for b in v.batch_sizes}
    row["memory"] = {k: {"weights_bytes": _weights_bytes(name, out, k, torch_models), "host_peak_bytes": host_peak[k],
                         "device_peak_bytes": device_peak.get(k), "measured_at_batch": max(v.batch_sizes)}
                     for k in ("original", "pruned")}
    return row


def _weights_bytes(name: str, out: Path, k: str, torch_models: dict) -> int:
    if name == "tensorrt":
        return (out / f"{k}.plan").stat().st_size
    if name.startswith("torch"):
        return sum(p.numel() * p.element_size() for p in torch_models[k].parameters())
    return sum(f.stat().st_size for f in [out / f"{k}.onnx", *external_files(out / f"{k}.onnx")])


def _parity(runners: dict, holdout: torch.Tensor, refs: dict[str, torch.Tensor], max_batch: int) -> dict:
    per = {}
    for k, r in runners.items():
        outs = [r.run(holdout[i : i + max_batch].numpy()) for i in range(0, len(holdout), max_batch)]
        per[k] = V.agreement(refs[k], torch.cat([torch.from_numpy(o) for o in outs]))
    worst = {"max_abs_err": max(p["max_abs_err"] for p in per.values()),
             "cosine_min": min(p["cosine_min"] for p in per.values())}
    return {**worst, **per}


def build_report(ctx: Context) -> dict[str, Any]:
    r, out = ctx.recipe, ctx.out
    original = ctx.original()
    pruned = load_pruned_model(out / "pruned.safetensors")
    search = json.loads((out / "search.json").read_text())
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    holdout = ctx.data().holdout
    models = {"original": original.model.cpu().eval(), "pruned": pruned.model.cpu().eval()}
    # fp32 references on the CPU: the ONNX files were exported from exactly these models.
    refs = {k: V.predict(m, holdout, r.data.batch_size, torch.device("cpu")) for k, m in models.items()}
    fid = V.agreement(refs["original"], refs["pruned"])
    fidelity = {k: fid[k] for k in ("cosine_mean", "cosine_min", "top1_agreement")}
    fidelity["images"] = fid["images"]
    if original.output == "embedding":
        fidelity["top1_agreement"] = None  # argmax of an embedding is no class
    fidelity["accuracy_original"] = V.accuracy(refs["original"], holdout.labels)
    fidelity["accuracy_pruned"] = V.accuracy(refs["pruned"], holdout.labels)
    fidelity["cosines"] = V.cosines(refs["original"], refs["pruned"])
    params = {k: V.count_params(m) for k, m in models.items()}
    flops = {k: V.count_flops(m, original.input_size) for k, m in models.items()}
    runtimes = {}
    for name in r.runtimes:
        runtimes[name] = _runtime_row(ctx, name, models, holdout.images, refs)
    return {
        "schema": SCHEMA,
        "name": r.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {**original.spec, "output": original.output, "input_size": list(original.input_size)},
        "params": {**params, "ratio": params["pruned"] / params["original"]},
        "flops": {**flops, "ratio": flops["pruned"] / flops["original"]},
        "widths": {"original": search["original_widths"], "pruned": search["widths"]},
        "prune": {
            "criterion": r.prune.criterion, "search": r.prune.search, "threshold": search["threshold"],
            "target_params": r.prune.target_params, "taylor": r.prune.taylor, "align": r.prune.align,
            "cached_search": r.prune.cache,
            "seconds": round(stages["score"]["seconds"] + search["seconds"], 3),  # wall time of score + search
            "block_forwards": search["block_forwards"],
            "block_forwards_naive": search["block_forwards_naive"],
            # budget mode: the final search's count above; every threshold tried together here
            "block_forwards_all_thresholds": search.get("block_forwards_all_thresholds"),
            "base_loss": search.get("base_loss"), "final_loss": (search.get("losses") or [None])[-1],
        },
        "fidelity": fidelity,
        "data": {"source": r.data.source, "calibration": len(ctx.data().calibration.images),
                 "validation": len(ctx.data().validation.images), "holdout": len(holdout.images),
                 "skipped_unreadable": ctx.data().skipped},
        "runtimes": runtimes,
        "environment": _environment(ctx),
        "validate_settings": {"warmup": r.validate_.warmup, "warmup_seconds": r.validate_.warmup_seconds,
                              "iterations": r.validate_.iterations,
                              "threads": r.validate_.threads, "batch_sizes": r.validate_.batch_sizes},
    }


def _environment(ctx: Context) -> dict[str, Any]:
    import onnx
    import timm

    return {"device": str(ctx.device), "cpu": _cpu_model(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
            "torch_threads": torch.get_num_threads()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parity_breaches(report: dict, max_abs_err: float, cosine_min: float,
                    reduced: tuple[float, float] | None = None) -> list[str]:
    """Runtimes whose outputs differ from torch's beyond the limits (fp16/bf16 rows: `reduced`)."""
    out = []
    for name, row in report["runtimes"].items():
        lim_err, lim_cos = reduced if reduced and row.get("precision") in ("fp16", "bf16") else (max_abs_err, cosine_min)
        for k in ("original", "pruned"):
            p = (row.get("parity") or {}).get(k)
            if p is None:
                continue
            # "not <=" so that NaN counts as a breach
            if not p["max_abs_err"] <= lim_err:
                out.append(f"{name} {k}: max_abs_err {p['max_abs_err']:.3g} > {lim_err:g}")
            if not p["cosine_min"] >= lim_cos:
                out.append(f"{name} {k}: cosine_min {p['cosine_min']:.7f} < {lim_cos:g}")
    return out


def apply_fidelity_gate(report: dict, cosine_mean: float | None, top1_agreement: float | None,
                        accuracy_drop: float | None) -> list[str]:
    """Record the optional fidelity gate; return its breaches."""
    f, breaches = report["fidelity"], []
    if cosine_mean is not None and not f["cosine_mean"] >= cosine_mean:
        breaches.append(f"fidelity cosine_mean {f['cosine_mean']:.5f} < {cosine_mean:g}")
    if top1_agreement is not None and not (f["top1_agreement"] or 0) >= top1_agreement:
        breaches.append(f"fidelity top1_agreement {f['top1_agreement']} < {top1_agreement:g}")
    if accuracy_drop is not None and f["accuracy_original"] is not None:
        drop = f["accuracy_original"] - f["accuracy_pruned"]
        if not drop <= accuracy_drop:
            breaches.append(f"fidelity accuracy drop {drop:.2f} points > {accuracy_drop:g}")
    report.setdefault("gates", {})["fidelity"] = {
        "passed": not breaches, "breaches": breaches,
        "limits": {"cosine_mean": cosine_mean, "top1_agreement": top1_agreement, "accuracy_drop": accuracy_drop}}
    return breaches


def apply_parity_gate(report: dict, max_abs_err: float, cosine_min: float,
                      reduced: tuple[float, float] | None = None) -> list[str]:
    """Record the parity gate in the report; return its breaches (empty when it passed)."""
    breaches = parity_breaches(report, max_abs_err, cosine_min, reduced)
    report.setdefault("gates", {})["parity"] = {"passed": not breaches, "breaches": breaches,
                                                "max_abs_err": max_abs_err, "cosine_min": cosine_min}
    return breaches


def write_report(out: Path, report: dict) -> None:
    from amp_deploy.plots import write_plots

    report["plots"] = write_plots(report, out / "plots")
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_md(report))


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt(n: float | None, spec: str = ",.0f") -> str:
    return "n/a" if n is None else format(n, spec)


def render_md(rep: dict) -> str:
    p, f, fi = rep["params"], rep["flops"], rep["fidelity"]
    lines = [f"# amp-deploy report: {rep['name']}", "",
             f"Model: {rep['model']['source']} `{rep['model']['name']}` ({rep['model']['output']}), "
             f"pruned with {rep['prune']['criterion']} / {rep['prune']['search']} "
             f"(threshold {rep['prune']['threshold']}) in {rep['prune']['seconds']:.1f} s.", "",
             "| | original | pruned | ratio |", "|---|---:|---:|---:|",
             f"| parameters | {_fmt(p['original'])} | {_fmt(p['pruned'])} | {p['ratio']:.3f} |",
             f"| FLOPs / image | {_fmt(f['original'])} | {_fmt(f['pruned'])} | {f['ratio']:.3f} |", ""]
    lines += ["## Fidelity (pruned vs original, holdout images)", "",
              f"- accuracy: {_fmt(fi['accuracy_original'], '.2f')}% -> {_fmt(fi['accuracy_pruned'], '.2f')}%",
              f"- top-1 agreement: {_fmt(fi['top1_agreement'] and fi['top1_agreement'] * 100, '.2f')}%",
              f"- cosine: mean {fi['cosine_mean']:.5f}, min {fi['cosine_min']:.5f} ({fi['images']} images)", ""]
    env, vs = rep.get("environment", {}), rep.get("validate_settings", {})
    lines += ["## Runtimes", "",
              f"Measured on {env.get('cpu')} ({env.get('cpu_count')} CPUs)"
              + (f", GPU {env['gpu']}" if env.get("gpu") else ", no GPU")
              + f"; torch {env.get('torch')}; warm-up {vs.get('warmup')} rounds and {vs.get('warmup_seconds')} s, "
              f"{vs.get('iterations')} timed iterations, original and pruned interleaved.", ""]
    for name, row in rep["runtimes"].items():
        if row["status"] != "ok":
            lines += [f"- **{name}**: {row['status']}: {row.get('reason', '')}", ""]
            continue
        lines += [f"### {name}", "", "Settings: " + ", ".join(f"{k} {v}" for k, v in row["settings"].items())
                  + f"; precision {row.get('precision', 'fp32')}.", ""]
        par = row.get("parity")
        if par:
            lines += [f"Parity vs torch (same weights): max abs err {par['max_abs_err']:.2e}, "
                      f"cosine min {par['cosine_min']:.7f}.", ""]
        lines += ["| batch | original p50 ms | pruned p50 ms | original p99 | pruned p99 | speedup (p50) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for b, o in row["latency_ms"]["original"].items():
            q = row["latency_ms"]["pruned"][b]
            lines.append(f"| {b} | {o['p50']:.3f} | {q['p50']:.3f} | {o['p99']:.3f} | {q['p99']:.3f} | "
                         f"{o['p50'] / q['p50']:.2f}x |")
        lines += [f"\n> {w}" for w in row.get("warnings", [])]
        mem = row["memory"]
        lines += ["", f"Weights: {mem['original']['weights_bytes']:,} -> {mem['pruned']['weights_bytes']:,} bytes. "
                  f"Peak host memory of the session (batch {mem['original']['measured_at_batch']}): "
                  f"{_mib(mem['original']['host_peak_bytes'])} -> {_mib(mem['pruned']['host_peak_bytes'])}.", ""]
    w = rep["widths"]
    lines += ["## MLP width per block", "", "| block | original | pruned | kept |", "|---:|---:|---:|---:|"]
    lines += [f"| {i} | {a} | {b} | {b / a:.0%} |" for i, (a, b) in enumerate(zip(w["original"], w["pruned"]))]
    if rep.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in rep["plots"]]
    lines.append("")
    for name, gate in rep.get("gates", {}).items():
        verdict = "passed" if gate.get("passed", True) else "FAILED: " + "; ".join(gate["breaches"])
        if name == "fidelity" and all(v is None for v in gate.get("limits", {}).values()):
            verdict = "no limits set (validate.fidelity)"
        lines.append(f"{name.capitalize()} gate: {verdict}")
    lines.append("")
    return "\n".join(lines)
