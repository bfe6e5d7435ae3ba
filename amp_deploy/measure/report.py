"""report.json (the keys scripts read: schema, params, flops, widths, prune, fidelity, runtimes) and
report.md (what a person reads): the schema, the gates and the rendering. Measuring is elsewhere
(`measure.validation`); this module only judges and renders what was measured.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from amp_deploy.prune.shape import from_record, from_report, heads_of, widths_of
from amp_deploy.prune.shape import heads_cut as shape_heads_cut

SCHEMA = "amp-deploy.report/1"
REDUCED = ("fp16", "bf16", "tf32")  # runtime precisions judged with validate.parity_reduced
QUANTIZED = ("int8", "fp8")  # judged with quantize.gate.PRECISION instead


def environment(device: str) -> dict[str, Any]:
    """What latency figures depend on: the machine and the library versions."""
    import onnx
    import timm

    return {"device": device, "cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
            "torch_threads": torch.get_num_threads()}


def cpu_model() -> str:
    """The CPU's model name (Linux), or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parity_breaches(report: dict, max_abs_err: float, cosine_min: float,
                    reduced: tuple[float, float] | None = None,
                    bf16: tuple[float | None, float, float] | None = None) -> list[str]:
    """Runtimes whose outputs differ from torch's beyond the limits (fp16/bf16/tf32 rows: `reduced`;
    bf16 rows: `bf16` = (max_abs_err or None, cosine_min, cosine_mean) when given: bf16 keeps 8 bits of
    mantissa, so its absolute error grows with the output's scale and the cosines judge it across models)."""
    out = []
    for name, row in report["runtimes"].items():
        if row.get("precision") in QUANTIZED:
            continue
        lim_err, lim_cos = reduced if reduced and row.get("precision") in REDUCED else (max_abs_err, cosine_min)
        lim_mean = None
        if bf16 is not None and row.get("precision") == "bf16":
            lim_err, lim_cos, lim_mean = bf16
        for k in ("original", "pruned"):
            p = (row.get("parity") or {}).get(k)
            if p is None:
                continue
            # "not <=" so that NaN counts as a breach
            if lim_err is not None and not p["max_abs_err"] <= lim_err:
                out.append(f"{name} {k}: max_abs_err {p['max_abs_err']:.3g} > {lim_err:g}")
            if not p["cosine_min"] >= lim_cos:
                out.append(f"{name} {k}: cosine_min {p['cosine_min']:.7f} < {lim_cos:g}")
            if lim_mean is not None and not p.get("cosine_mean", float("nan")) >= lim_mean:
                out.append(f"{name} {k}: cosine_mean {p.get('cosine_mean')} < {lim_mean:g}")
    return out


def apply_fidelity_gate(report: dict, cosine_mean: float | None, top1_agreement: float | None,
                        accuracy_drop: float | None) -> tuple[list[str], list[str]]:
    """Record the optional fidelity gate; return its breaches and the limits it could not judge
    (an accuracy drop without labels, a top-1 agreement without a classifier head)."""
    f, breaches, undecided = report["fidelity"], [], []
    if cosine_mean is not None and not f["cosine_mean"] >= cosine_mean:
        breaches.append(f"fidelity cosine_mean {f['cosine_mean']:.5f} < {cosine_mean:g}")
    if top1_agreement is not None:
        if f.get("top1_agreement") is None:
            undecided.append("validate.fidelity.top1_agreement: the model has no classifier head (no top-1 to agree on)")
        elif not f["top1_agreement"] >= top1_agreement:
            breaches.append(f"fidelity top1_agreement {f['top1_agreement']} < {top1_agreement:g}")
    if accuracy_drop is not None:
        if f.get("accuracy_original") is None or f.get("accuracy_pruned") is None:
            undecided.append("validate.fidelity.accuracy_drop: the holdout images have no labels (a class-folder "
                             "data.path or data.source digits gives them)")
        else:
            drop = f["accuracy_original"] - f["accuracy_pruned"]
            if not drop <= accuracy_drop:
                breaches.append(f"fidelity accuracy drop {drop:.2f} points > {accuracy_drop:g}")
    report.setdefault("gates", {})["fidelity"] = {
        "passed": not breaches and not undecided, "breaches": breaches, "undecided": undecided,
        "limits": {"cosine_mean": cosine_mean, "top1_agreement": top1_agreement, "accuracy_drop": accuracy_drop}}
    return breaches, undecided


def apply_parity_gate(report: dict, max_abs_err: float, cosine_min: float,
                      reduced: tuple[float, float] | None = None,
                      bf16: tuple[float | None, float, float] | None = None) -> list[str]:
    """Record the parity gate in the report; return its breaches (empty when it passed)."""
    breaches = parity_breaches(report, max_abs_err, cosine_min, reduced, bf16)
    report.setdefault("gates", {})["parity"] = {"passed": not breaches, "breaches": breaches,
                                                "max_abs_err": max_abs_err, "cosine_min": cosine_min}
    return breaches


def apply_quantization_gate(report: dict, gates: dict[str, dict[str, float | None]]) -> list[str]:
    """Quantized rows against the fp32 model they were made from, with each precision's limits
    (`gates`: precision -> cosine_mean, cosine_min, max_abs_err or None); returns the breaches."""
    out = []
    for name, row in report["runtimes"].items():
        limits = gates.get(row.get("precision"))
        if limits is None or not row.get("parity"):
            continue
        for k in ("original", "pruned"):
            p = row["parity"][k]
            if not p["cosine_mean"] >= limits["cosine_mean"]:
                out.append(f"{name} {k}: cosine_mean {p['cosine_mean']:.5f} < {limits['cosine_mean']:g}")
            if not p["cosine_min"] >= limits["cosine_min"]:
                out.append(f"{name} {k}: cosine_min {p['cosine_min']:.5f} < {limits['cosine_min']:g}")
            if limits.get("max_abs_err") is not None and not p["max_abs_err"] <= limits["max_abs_err"]:
                out.append(f"{name} {k}: max_abs_err {p['max_abs_err']:.3g} > {limits['max_abs_err']:g}")
    for fmt, per in ((report.get("quantize") or {}).get("formats") or {}).items():
        for k, info in per.items():  # a "quantized" model none of whose matrix products is quantized
            if info.get("quantized_matmuls") == 0:
                out.append(f"{fmt} {k}: no matrix product quantized (quantize.op_types {info.get('op_types')})")
    if out or any(r.get("precision") in QUANTIZED for r in report["runtimes"].values()):
        report.setdefault("gates", {})["quantization"] = {"passed": not out, "breaches": out, "limits": gates}
    return out


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt(n: float | None, spec: str = ",.0f") -> str:
    return "n/a" if n is None else format(n, spec)


def _distill_md(rep: dict) -> list[str]:
    d, b = rep.get("distill"), rep["fidelity"].get("before_distill")
    if not d or not b:
        return []
    resumed = f", resumed after epoch {d['resumed_after_epoch']}" if d.get("resumed_after_epoch") else ""
    return ["## Distillation", "",
            f"{d['epochs']} epochs on {d['images']} images ({d['loss']} loss, lr {d['lr']:g}) in {d['seconds']:.1f} s"
            f"{resumed}; loss {d['losses'][0]:.4g} -> {d['losses'][-1]:.4g}.", *_probe_md(d), "",
            "| | pruned only | pruned + distilled |", "|---|---:|---:|",
            f"| accuracy % | {_fmt(b['accuracy_pruned'], '.2f')} | {_fmt(rep['fidelity']['accuracy_pruned'], '.2f')} |",
            f"| top-1 agreement | {_fmt(b['top1_agreement'], '.4f')} | {_fmt(rep['fidelity']['top1_agreement'], '.4f')} |",
            f"| cosine mean | {b['cosine_mean']:.5f} | {rep['fidelity']['cosine_mean']:.5f} |",
            *_before_row("k-NN top-1 %", b.get("knn_top1"), rep["fidelity"].get("knn_top1")),
            *_before_row("zero-shot top-1 %", b.get("zero_shot_top1"), rep["fidelity"].get("zero_shot_top1")), ""]


def _probe_md(d: dict) -> list[str]:
    """distill.lr auto: the rates probed, their validation losses, the one chosen."""
    pr = d.get("lr_probe")
    if not pr:
        return []
    tried = ", ".join(f"{float(lr):g}: {loss:.5g}" for lr, loss in pr["losses"].items())
    return ["", f"Learning rate chosen by the probe (distill.lr auto): {pr['lr']:g}; distillation loss on the "
                f"validation images after {pr['steps']} steps at each rate: {tried}."]


def _uniform_md(rep: dict) -> list[str]:
    """What the uniform check decided (prune.uniform_check), when it ran."""
    u = rep["prune"].get("uniform_check")
    if not u:
        return []
    if u["chosen"] == "uniform":
        return ["", f"The same width in every block ({u['widths'][0]}) departed less from the original than the threshold "
                    f"search's widths on the search loss ({u['loss']:.4g} vs {u['adaptive_loss']:.4g}): uniform widths "
                    "kept (`prune.uniform_check`)."]
    return ["", f"Uniform widths at the same budget departed more ({u['loss']:.4g} vs {u['adaptive_loss']:.4g} on the "
                "search loss): the threshold search's widths kept."]


def _before_row(label: str, before, after) -> list[str]:
    """A distillation table row for an embedding measure (pruned before distillation, and after)."""
    if not isinstance(before, (int, float)) or not isinstance(after, dict) or "pruned" not in after:
        return []
    return [f"| {label} | {before:.2f} | {after['pruned']:.2f} |"]


def _quantization_md(rep: dict) -> list[str]:
    """Quantized rows: their parity with the fp32 model, their fidelity to the original, and what
    pruning and quantization each bought in latency (against the original fp32 model)."""
    q = rep.get("quantize")
    if not q:
        return []
    rows = {n: r for n, r in rep["runtimes"].items() if r.get("precision") in QUANTIZED}
    lines = ["## Quantization", "", f"Calibrated on {q.get('calibration_images')} calibration images "
             "(never the holdout). Parity: against the fp32 model it was quantized from; fidelity: against the "
             "original fp32 model.", "",
             "| row | model | parity cosine mean | fidelity cosine mean | top-1 agreement | accuracy % | k-NN top-1 % "
             "| file bytes |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        if row["status"] != "ok":
            lines.append(f"| {name} | | {row['status']}: {row.get('reason', '')} | | | | | |")
            continue
        for k in ("original", "pruned"):
            par, fid = row["parity"][k], (row.get("fidelity") or {}).get(k, {})
            agree = fid.get("top1_agreement")
            lines.append(f"| {name} | {k} | {par['cosine_mean']:.5f} | {_fmt(fid.get('cosine_mean'), '.5f')} | "
                         f"{_fmt(agree and agree * 100, '.2f')} | {_fmt(fid.get('accuracy'), '.2f')} | "
                         f"{_fmt(fid.get('knn_top1'), '.2f')} | {row['memory'][k]['weights_bytes']:,} |")
    base_name = next((n for n in ("onnxruntime", "tensorrt") if rep["runtimes"].get(n, {}).get("status") == "ok"), None)
    if base_name:
        base = rep["runtimes"][base_name]["latency_ms"]
        lines += ["", f"Latency p50 in ms, and speedup over the original fp32 model on {base_name} (each row's two "
                  "models interleaved; rows measured one after another):", ""]
        batches = list(base["original"])
        lines += ["| model | " + " | ".join(f"b={b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
        entries = [(f"original {base_name} fp32", base["original"]), (f"pruned {base_name} fp32", base["pruned"])]
        entries += [(f"{k} {name}", r["latency_ms"][k]) for name, r in rows.items() if r["status"] == "ok"
                    for k in ("original", "pruned")]
        for label, lat in entries:
            cells = [f"{lat[b]['p50']:.3f} ({base['original'][b]['p50'] / lat[b]['p50']:.2f}x)" if b in lat else "n/a"
                     for b in batches]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(n.endswith("-on-onnxruntime") for n in rows):
        lines += ["", "A TensorRT Q/DQ model on ONNX Runtime's CPU provider (`*-on-onnxruntime`) is there for its "
                  "fidelity: its high-precision parts are fp16, which a CPU emulates, so its latency says nothing "
                  "of TensorRT's."]
    problems = [f"{fmt} {k}: {p}" for fmt, per in q.get("formats", {}).items() for k, info in per.items()
                for p in info.get("coverage_problems", [])]
    lines += ["", "Q/DQ placement: every matrix product of every block quantized." if not problems
              else "Q/DQ placement problems: " + "; ".join(problems), ""]
    return lines


def _budget_md(rep: dict) -> list[str]:
    """The latency budget: asked, predicted, measured by the search and by validate; the table."""
    lb = rep.get("latency_budget")
    if not lb:
        return []
    v = lb.get("validate", {})
    seen = (f"{v['measured_speedup']:.3f}x (row {v['row']}, median of per-round ratios)" if v.get("status") == "ok"
            else f"{v.get('status')}: {v.get('reason')}")
    heads = bool(lb["table"].get("heads"))
    asked = (f"{lb['target_latency_ms']:g} ms ({lb['target_speedup']:.3f}x)" if lb.get("target_latency_ms")
             else f"{lb['target_speedup']:g}x")
    if lb.get("baseline") == "fp32":
        asked += (f" over the original in fp32 (prune.latency.baseline; the original runs "
                  f"{lb['baseline_ratio']:.3f}x faster in {lb['precision']}, measured)")
    lines = ["## Latency budget", "",
             f"Asked: {asked} on {lb['runtime']} {lb['precision']} at batch {lb['batch']} (reachable: "
             f"{lb['max_speedup']:.2f}x with every MLP at its smallest candidate width"
             f"{' and its fewest heads' if lb['table'].get('heads') else ''}).", "",
             "| | speedup |", "|---|---:|",
             f"| predicted (latency table, additive) | {lb['predicted_speedup']:.3f}x |",
             f"| measured by the search (end-to-end check) | {lb['measured_speedup']:.3f}x |",
             f"| measured by validate | {seen} |", "",
             *([f"Speedups over the original in fp32: the table's predictions times {lb['baseline_ratio']:.3f}; "
                "the checks time each chosen model against the fp32 original.", ""]
               if lb.get("baseline") == "fp32" else []),
             f"Target {'met' if lb['met'] else 'MISSED'} within {lb['tolerance']:.0%} by the search's check.", "",
             "End-to-end checks (each asks the knapsack for `aim`; the next aim corrects the last miss):", "",
             "| check | aim | predicted | measured | summed loss increase | widths |" + (" heads |" if heads else ""),
             "|---:|---:|---:|---:|---:|---|" + ("---|" if heads else "")]
    for i, c in enumerate(lb["checks"]):
        shapes = from_record(c)  # a check of a report from before shapes: its widths (and heads)
        lines.append(f"| {i + 1} | {c['aim']:.3f}x | {c['predicted_speedup']:.3f}x | {c['measured_speedup']:.3f}x | "
                     f"{c['loss_increase']:.4g} | {' '.join(map(str, widths_of(shapes)))} |"
                     + (f" {' '.join(map(str, heads_of(shapes) or []))} |" if heads else ""))
    t = lb["table"]
    lines += ["", f"Latency table: every block at one width, {t['rounds']} interleaved rounds with the full model "
              f"({t['full_ms']:.3f} ms); ratio = median of per-round latency ratios; fitted = made monotone; "
              "saving = one block's share.", "",
              "| width | p50 ms | ratio | fitted | saving per block |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {w} | {ms:.3f} | {r:.4f} | {fr:.4f} | {sv:.4%} |"
              for w, ms, r, fr, sv in zip(t["widths"], t["p50_ms"], t["ratio"], t["fitted"], t["block_saving"])]
    if heads:
        h = t["heads"]
        base = h.get("mlp_width", t["widths"][-1])
        lines += ["", f"Heads axis: every block at one head count, every MLP at {base} neurons, timed the same way "
                  "(ratios to the full model; a head count saves what it takes off that model's latency); a block's "
                  "(width, heads) saves the sum of the two savings.", "",
                  "| heads | p50 ms | ratio | fitted | saving per block |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {n} | {ms:.3f} | {r:.4f} | {fr:.4f} | {sv:.4%} |"
                  for n, ms, r, fr, sv in zip(h["heads"], h["p50_ms"], h["ratio"], h["fitted"], h["block_saving"])]
    return lines + [""]


def _how_md(rep: dict) -> str:
    """What decided the widths: the threshold, the parameter budget, the latency budget or the ratio."""
    pr = rep["prune"]
    lb = rep.get("latency_budget")
    if lb:
        return (f"latency budget {lb['target_speedup']:.3g}x on {lb['runtime']} {lb['precision']} at batch "
                f"{lb['batch']}" + (" over the fp32 original" if lb.get("baseline") == "fp32" else ""))
    if pr.get("target_params") is not None:
        t = pr.get("threshold")
        return f"parameter budget {pr['target_params']:g}" + (f", threshold {t:.3g}" if t is not None else "")
    if pr.get("search") == "uniform":
        return "the same fraction of neurons in every block"
    return f"threshold {pr.get('threshold')}"


def heads_cut(rep: dict) -> bool:
    """Whether the report's model had attention heads cut (reports from before heads: no)."""
    return shape_heads_cut(from_report(rep, "original"), from_report(rep, "pruned"))


def render_md(rep: dict) -> str:
    """report.md from report.json's dict."""
    p, f, fi = rep["params"], rep["flops"], rep["fidelity"]
    lines = [f"# amp-deploy report: {rep['name']}", "",
             f"Model: {rep['model']['source']} `{rep['model']['name']}` ({rep['model']['output']}), "
             f"pruned with {rep['prune']['criterion']} / {rep['prune']['search']} "
             f"({_how_md(rep)}) in {rep['prune']['seconds']:.1f} s.", *_uniform_md(rep), "",
             "| | original | pruned | ratio |", "|---|---:|---:|---:|",
             f"| parameters | {_fmt(p['original'])} | {_fmt(p['pruned'])} | {p['ratio']:.3f} |",
             f"| FLOPs / image | {_fmt(f['original'])} | {_fmt(f['pruned'])} | {f['ratio']:.3f} |", ""]
    lines += ["## Fidelity (pruned vs original, holdout images)", ""]
    if fi.get("accuracy_original") is not None:  # labelled holdout images
        lines.append(f"- accuracy: {fi['accuracy_original']:.2f}% -> {_fmt(fi['accuracy_pruned'], '.2f')}%")
    if fi.get("top1_agreement") is not None:  # a classifier head
        lines.append(f"- top-1 agreement: {fi['top1_agreement'] * 100:.2f}%")
    lines.append(f"- cosine: mean {fi['cosine_mean']:.5f}, min {fi['cosine_min']:.5f} ({fi['images']} images)")
    if fi.get("knn_top1"):
        kn = fi["knn_top1"]
        lines.append(f"- k-NN top-1 (k = {kn['k']}, cosine, against the calibration images): "
                     f"{kn['original']:.2f}% -> {kn['pruned']:.2f}%")
    if fi.get("zero_shot_top1"):
        zs = fi["zero_shot_top1"]
        lines.append(f"- zero-shot top-1 (CLIP prompt templates, text tower unpruned): "
                     f"{zs['original']:.2f}% -> {zs['pruned']:.2f}%")
    lines.append("")
    lines += _distill_md(rep)
    lines += _budget_md(rep)
    lines += _quantization_md(rep)
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
                  f"Peak host memory of the session (batch {mem['original']['measured_at_batch']}, measured in "
                  f"{mem['original'].get('host_peak_measured_in', 'this process')}): "
                  f"{_mib(mem['original']['host_peak_bytes'])} -> {_mib(mem['pruned']['host_peak_bytes'])}.", ""]
        lines += [f"> host memory of the {k} model not measured: {m['host_peak_missing']}" for k, m in mem.items()
                  if m.get("host_peak_missing")]
    shapes = list(zip(from_report(rep, "original"), from_report(rep, "pruned")))
    if heads_cut(rep):  # both axes per block
        lines += ["## MLP width and attention heads per block", "",
                  "| block | original | pruned | kept | heads |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {i} | {a.width} | {b.width} | {b.width / a.width:.0%} | {b.heads} of {a.heads} |"
                  for i, (a, b) in enumerate(shapes)]
    else:
        lines += ["## MLP width per block", "", "| block | original | pruned | kept |", "|---:|---:|---:|---:|"]
        lines += [f"| {i} | {a.width} | {b.width} | {b.width / a.width:.0%} |" for i, (a, b) in enumerate(shapes)]
    if rep.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in rep["plots"]]
    lines.append("")
    for name, gate in rep.get("gates", {}).items():
        verdict = ("passed" if gate.get("passed", True) else "FAILED: " + "; ".join(gate["breaches"])
                   if gate["breaches"] else "COULD NOT JUDGE: " + "; ".join(gate.get("undecided", [])))
        if name == "fidelity" and all(v is None for v in gate.get("limits", {}).values()):
            verdict = "no limits set (validate.fidelity)"
        lines.append(f"{name.capitalize()} gate: {verdict}")
    lines.append("")
    return "\n".join(lines)
