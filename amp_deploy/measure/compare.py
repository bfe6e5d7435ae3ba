"""`amp-deploy compare`: reports side by side, and a regression gate for CI.

The first report is the baseline. For every runtime and batch size measured in the baseline and
in another report, p50, p99 and throughput of the pruned model are compared; a p50 slower than the
baseline's by more than the gate's percentage is a regression.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amp_deploy.errors import UserError
from amp_deploy.measure.report import SCHEMA

# Settings that make latencies incomparable when they differ.
_SETTINGS = ("device", "cpu", "cpu_count", "torch", "onnx", "torch_threads")


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        rep = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: report not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON report ({e})") from None
    if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
        raise UserError(f"{path}: not an amp-deploy report (schema {SCHEMA!r} expected)")
    rep["_path"] = str(path)
    return rep


def _pct(new: float, old: float) -> float:
    return (new / old - 1.0) * 100.0 if old else 0.0


def _latency_rows(base: dict, other: dict, label: str) -> list[dict[str, Any]]:
    rows = []
    for rt, row in base["runtimes"].items():
        o_row = other["runtimes"].get(rt, {})
        if row.get("status") != "ok" or o_row.get("status") != "ok":
            continue
        for model in ("pruned", "original"):
            for b, a in row["latency_ms"][model].items():
                c = o_row["latency_ms"][model].get(b)
                if c is None:
                    continue
                rows.append({"report": label, "runtime": rt, "model": model, "batch": int(b),
                             "p50": [a["p50"], c["p50"]], "p99": [a["p99"], c["p99"]],
                             "throughput": [a["throughput"], c["throughput"]],
                             "p50_change_pct": _pct(c["p50"], a["p50"]),
                             "p99_change_pct": _pct(c["p99"], a["p99"]),
                             "throughput_change_pct": _pct(c["throughput"], a["throughput"])})
    return rows


def _setting_warnings(base: dict, other: dict, label: str) -> list[str]:
    out = []
    ea, eb = base.get("environment", {}), other.get("environment", {})
    for k in _SETTINGS:
        if ea.get(k) != eb.get(k):
            out.append(f"{label}: {k} differs ({ea.get(k)} vs {eb.get(k)}): latencies may not be comparable")
    va, vb = base.get("validate_settings", {}), other.get("validate_settings", {})
    for k in sorted(set(va) | set(vb)):
        if va.get(k) != vb.get(k):
            out.append(f"{label}: validate.{k} differs ({va.get(k)} vs {vb.get(k)})")
    return out


def compare(reports: list[dict[str, Any]], fail_on_regression: float | None = None) -> dict[str, Any]:
    """Compare every report with the first; list rows, summary figures, warnings and regressions."""
    if len(reports) < 2:
        raise UserError("compare needs at least two reports")
    base = reports[0]
    labels = [chr(ord("A") + i) for i in range(len(reports))]
    rows, warnings = [], []
    for label, rep in zip(labels[1:], reports[1:]):
        rows += _latency_rows(base, rep, label)
        warnings += _setting_warnings(base, rep, label)
    if not rows:
        warnings.append("no runtime and batch size was measured in both the baseline and another report")
    summary = {label: {"path": rep["_path"], "params": rep["params"]["pruned"], "flops": rep["flops"]["pruned"],
                       "widths": rep["widths"]["pruned"],
                       "accuracy": rep["fidelity"].get("accuracy_pruned"),
                       "cosine_mean": rep["fidelity"].get("cosine_mean")}
               for label, rep in zip(labels, reports)}
    regressions = []
    if fail_on_regression is not None:
        regressions = [f"{r['report']} {r['runtime']} {r['model']} batch {r['batch']}: p50 "
                       f"{r['p50'][0]:.3f} -> {r['p50'][1]:.3f} ms ({r['p50_change_pct']:+.1f}% > {fail_on_regression:g}%)"
                       for r in rows if r["model"] == "pruned" and r["p50_change_pct"] > fail_on_regression]
    return {"baseline": "A", "summary": summary, "rows": rows, "warnings": warnings, "regressions": regressions}


def render_md(cmp: dict[str, Any]) -> str:
    lines = ["| report | params | FLOPs | accuracy % | cosine mean | widths |", "|---|---:|---:|---:|---:|---|"]
    for label, s in cmp["summary"].items():
        acc = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.2f}"
        lines.append(f"| {label} | {s['params']:,} | {s['flops']:,} | {acc} | {s['cosine_mean']:.5f} | "
                     f"{' '.join(map(str, s['widths']))} |")
    lines += ["", "| vs A | runtime | model | batch | p50 ms (A -> X) | change | p99 ms (A -> X) | images/s change |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in cmp["rows"]:
        lines.append(f"| {r['report']} | {r['runtime']} | {r['model']} | {r['batch']} | {r['p50'][0]:.3f} -> "
                     f"{r['p50'][1]:.3f} | {r['p50_change_pct']:+.1f}% | {r['p99'][0]:.3f} -> {r['p99'][1]:.3f} | "
                     f"{r['throughput_change_pct']:+.1f}% |")
    for w in cmp["warnings"]:
        lines.append(f"\n> warning: {w}")
    for r in cmp["regressions"]:
        lines.append(f"\n**regression**: {r}")
    return "\n".join(lines) + "\n"
