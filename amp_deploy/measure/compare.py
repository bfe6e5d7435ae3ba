"""`amp-deploy compare`: reports side by side, and a regression gate for CI.

The first report is the baseline. For every runtime and batch size measured in the baseline and
in another report, p50, p99 and throughput are compared. The gate (`--fail-on-regression PCT`) is one
rule on the 95% bootstrap interval of the change of the median (median(B) / median(A) - 1): a
REGRESSION when the whole interval lies above PCT (the evidence puts the slowdown above the gate), a
PASS when the whole interval lies below PCT (the evidence rules such a slowdown out), and COULD NOT
JUDGE (exit 3) otherwise, with the number of timed rounds that would narrow the interval enough. A
gate that has not ruled a regression out has not passed. The pruned model's samples are taken as
ratios to the original's in the same timed round (the validate stage interleaves the two, so each
round's pair ran back to back): a machine that is slower as a whole during one build's run moves
both and not their ratio. On this project's shared 2-core VM such drift between runs reached 2x
(benchmarks/compare_noise.py), which no test of raw samples can tell from a regression. The price: a
slowdown of the runtime itself that hits original and pruned alike is not a regression of the build
(the original's raw change is shown in its own rows). A batch size or runtime measured in the baseline
and not in another report cannot be judged (exit 3; a runtime that failed there is a regression).
Reports without samples (made before samples were kept) are judged on the two p50s: a regression
above PCT, and otherwise not judged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amp_deploy.errors import UserError
from amp_deploy.measure.report import SCHEMA
from amp_deploy.prune.shape import from_json, from_report, heads_of, to_json, widths_of

BOOTSTRAP = 2000  # resamples for the interval of the change
MIN_ROUNDS = 10  # fewer timed rounds per report give a bootstrap interval of a median too coarse to judge by


def change_test(a: list[float], b: list[float], pct: float | None, seed: int = 0) -> dict[str, Any]:
    """Is B slower than A by more than `pct` percent? The 95% bootstrap interval of
    median(B) / median(A) - 1 decides: `verdict` is "regression" when it lies wholly above pct, "pass"
    when wholly below, "undecided" otherwise (then `rounds_needed`: the rounds per report at which an
    interval of this spread, shrinking as 1/sqrt(rounds), would clear pct from its centre).

    Returns {"ci95_pct": [lo, hi], "verdict", "regression": bool, "rounds": [n_a, n_b], "rounds_needed"}.
    """
    import math

    import numpy as np

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    ma = np.median(xa[rng.integers(0, len(xa), (BOOTSTRAP, len(xa)))], axis=1)
    mb = np.median(xb[rng.integers(0, len(xb), (BOOTSTRAP, len(xb)))], axis=1)
    lo, hi = (float(v) for v in np.percentile(mb / ma - 1.0, [2.5, 97.5]) * 100)
    out: dict[str, Any] = {"ci95_pct": [lo, hi], "verdict": None, "regression": False,
                           "rounds": [len(xa), len(xb)], "rounds_needed": None}
    if pct is not None:
        verdict = "regression" if lo > pct else "pass" if hi < pct else "undecided"
        if min(len(xa), len(xb)) < MIN_ROUNDS:
            verdict = "undecided"
        out.update(verdict=verdict, regression=verdict == "regression")
        if verdict == "undecided":
            centre, half = (lo + hi) / 2, max((hi - lo) / 2, 1e-9)
            gap = abs(centre - pct)
            n = min(len(xa), len(xb))
            out["rounds_needed"] = max(MIN_ROUNDS, math.ceil(n * (half / gap) ** 2 * 1.2)) if gap > 0 else None
    return out


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
    for key in ("runtimes", "params", "flops", "widths", "fidelity"):
        if not isinstance(rep.get(key), dict):
            raise UserError(f"{path}: the report has no '{key}' section (written by an interrupted or edited build?)")
    rep["_path"] = str(path)
    return rep


def gate_threshold(pct: float | None) -> None:
    """A UserError for a --fail-on-regression that can never mean anything: negative, NaN or infinite."""
    import math

    if pct is not None and not (math.isfinite(pct) and pct >= 0):
        raise UserError(f"--fail-on-regression {pct:g}: a percentage of at least 0 (a slowdown the gate tolerates)")


def _pct(new: float, old: float) -> float:
    return (new / old - 1.0) * 100.0 if old else 0.0


def _latency_rows(base: dict, other: dict, label: str, pct: float | None = None,
                  unmeasured: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows for every runtime and batch size measured in both; a runtime measured in the baseline and
    not in `other` (failed, skipped, missing) goes to `unmeasured`."""
    rows = []
    for rt, row in base["runtimes"].items():
        o_row = other["runtimes"].get(rt, {})
        if row.get("status") != "ok":
            continue
        if o_row.get("status") != "ok":
            if unmeasured is not None:
                unmeasured.append({"report": label, "runtime": rt, "status": o_row.get("status", "missing"),
                                   "reason": o_row.get("reason") or "not in the report"})
            continue
        for model in ("pruned", "original"):
            for b, a in row["latency_ms"][model].items():
                c = o_row["latency_ms"][model].get(b)
                if c is None:
                    if unmeasured is not None and model == "pruned":
                        unmeasured.append({"report": label, "runtime": f"{rt} batch {b}", "status": "not measured",
                                           "reason": f"batch {b} is not among its batch sizes"})
                    continue
                rows.append({"report": label, "runtime": rt, "model": model, "batch": int(b),
                             "p50": [a["p50"], c["p50"]], "p99": [a["p99"], c["p99"]],
                             "throughput": [a["throughput"], c["throughput"]],
                             "p50_change_pct": _pct(c["p50"], a["p50"]),
                             "p99_change_pct": _pct(c["p99"], a["p99"]),
                             "throughput_change_pct": _pct(c["throughput"], a["throughput"]),
                             "test": _test(row, o_row, model, b, pct)})
    return rows


def round_ratios(row: dict, model: str, batch: str) -> list[float] | None:
    """Per timed round, `model`'s time over the original's in the same round (the two run back to
    back, interleaved): what drift of the whole machine between two builds' runs cannot move."""
    lat = row["latency_ms"]
    a, o = lat[model].get(batch, {}).get("samples"), lat["original"].get(batch, {}).get("samples")
    if not a or not o or len(a) != len(o):
        return None
    return [x / y for x, y in zip(a, o)]


def _test(base_row: dict, other_row: dict, model: str, batch: str, pct: float | None) -> dict[str, Any] | None:
    """The pruned model: its per-round ratio to the original, A vs B (drift-corrected); the original
    itself (or a report without paired samples): the raw samples."""
    if model == "pruned":
        ra, rb = round_ratios(base_row, model, batch), round_ratios(other_row, model, batch)
        if ra and rb:
            return {**change_test(ra, rb, pct), "method": "per-round ratio to the original (drift-corrected)"}
    a = base_row["latency_ms"][model][batch].get("samples")
    b = other_row["latency_ms"][model].get(batch, {}).get("samples")
    return {**change_test(a, b, pct), "method": "raw samples"} if a and b else None


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
    """Compare every report with the first; list rows, summary figures, warnings, regressions, and
    what the gate could not judge (`undecided`: too few rounds for the test, a runtime measured in
    the baseline but not in a later report)."""
    if len(reports) < 2:
        raise UserError("compare needs at least two reports")
    gate_threshold(fail_on_regression)
    base = reports[0]
    labels = [chr(ord("A") + i) for i in range(len(reports))]
    rows, warnings, unmeasured = [], [], []
    for label, rep in zip(labels[1:], reports[1:]):
        rows += _latency_rows(base, rep, label, fail_on_regression, unmeasured)
        warnings += _setting_warnings(base, rep, label)
    if not rows:
        warnings.append("no runtime and batch size was measured in both the baseline and another report")
    summary = {label: {"path": rep["_path"], "params": rep["params"].get("pruned"), "flops": rep["flops"].get("pruned"),
                       "shapes": to_json(from_report(rep, "pruned")),  # reports before heads: widths, heads null
                       "accuracy": rep["fidelity"].get("accuracy_pruned"),
                       "cosine_mean": rep["fidelity"].get("cosine_mean")}
               for label, rep in zip(labels, reports)}
    regressions: list[str] = []
    undecided: list[str] = []
    if fail_on_regression is not None:
        _judge(rows, unmeasured, fail_on_regression, regressions, undecided, warnings)
    return {"baseline": "A", "summary": summary, "rows": rows, "warnings": warnings, "regressions": regressions,
            "undecided": undecided, "unmeasured": unmeasured}


def _judge(rows: list[dict], unmeasured: list[dict], pct: float, regressions: list[str], undecided: list[str],
           warnings: list[str]) -> None:
    """The regression gate over the pruned rows: a regression, a pass, or a row it could not judge."""
    for u in unmeasured:
        where = f"{u['report']} {u['runtime']}"
        if u["status"] == "failed":  # it ran in the baseline and broke in this build: that is a regression
            regressions.append(f"{where}: measured in A, failed here ({u['reason']})")
        else:
            undecided.append(f"{where}: measured in A, {u['status']} here ({u['reason']}): no latency to judge")
    if not rows and not unmeasured:
        undecided.append("no runtime and batch size was measured in both reports")
    for r in (r for r in rows if r["model"] == "pruned"):
        where = (f"{r['report']} {r['runtime']} {r['model']} batch {r['batch']}: p50 {r['p50'][0]:.3f} -> "
                 f"{r['p50'][1]:.3f} ms ({r['p50_change_pct']:+.1f}%")
        t = r["test"]
        if t is None:  # a report without samples: the two p50s alone
            if r["p50_change_pct"] > pct:
                regressions.append(f"{where} > {pct:g}%, p50s only: no samples)")
            else:
                undecided.append(f"{where}, p50s only: no timing samples to rule out a slowdown over {pct:g}%)")
            continue
        ci = f"95% CI {t['ci95_pct'][0]:+.1f}%..{t['ci95_pct'][1]:+.1f}%"
        if t["verdict"] == "regression":
            regressions.append(f"{where}, {ci}: slower by more than {pct:g}%)")
        elif t["verdict"] == "undecided" and min(t["rounds"]) < MIN_ROUNDS:
            undecided.append(f"{where}): {t['rounds'][0]} and {t['rounds'][1]} timed rounds are too few to judge by; "
                             f"validate.iterations >= {MIN_ROUNDS} resolves it")
        elif t["verdict"] == "undecided":
            need = (f"about {max(MIN_ROUNDS, t['rounds_needed'])} timed rounds per report (validate.iterations) "
                    "would resolve it" if t["rounds_needed"] else "more timed rounds (validate.iterations) would "
                    "resolve it")
            undecided.append(f"{where}, {ci} holds {pct:g}%: {t['rounds'][0]} and {t['rounds'][1]} rounds neither "
                             f"rule a slowdown over {pct:g}% out nor show it; {need})")
    if any(r["test"] is None for r in rows):
        warnings.append("some reports keep no timing samples (made before they were kept): those rows are "
                        "judged on the two p50s alone, which noise can move past the threshold")


def render_md(cmp: dict[str, Any]) -> str:
    shapes = {label: from_json(s["shapes"]) for label, s in cmp["summary"].items()}
    heads = any(heads_of(v) for v in shapes.values())
    lines = [f"| report | params | FLOPs | accuracy % | cosine mean | widths |{' heads |' if heads else ''}",
             f"|---|---:|---:|---:|---:|---|{'---|' if heads else ''}"]
    for label, s in cmp["summary"].items():
        acc = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.2f}"
        h = heads_of(shapes[label])
        head_cell = f" {' '.join(map(str, h)) if h else 'n/a'} |" if heads else ""
        lines.append(f"| {label} | {s['params']:,} | {s['flops']:,} | {acc} | {s['cosine_mean']:.5f} | "
                     f"{' '.join(map(str, widths_of(shapes[label])))} |{head_cell}")
    lines += ["", "| vs A | runtime | model | batch | p50 ms (A -> X) | change | 95% CI | p99 ms (A -> X) | "
              "images/s change |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in cmp["rows"]:
        lines.append(f"| {r['report']} | {r['runtime']} | {r['model']} | {r['batch']} | {r['p50'][0]:.3f} -> "
                     f"{r['p50'][1]:.3f} | {r['p50_change_pct']:+.1f}% | {ci_text(r)} | {r['p99'][0]:.3f} -> "
                     f"{r['p99'][1]:.3f} | {r['throughput_change_pct']:+.1f}% |")
    for w in cmp["warnings"]:
        lines.append(f"\n> warning: {w}")
    for r in cmp["regressions"]:
        lines.append(f"\n**regression**: {r}")
    for u in cmp.get("undecided", []):
        lines.append(f"\n**could not judge**: {u}")
    return "\n".join(lines) + "\n"


def ci_text(row: dict[str, Any]) -> str:
    """The change's 95% interval, or n/a for reports without samples."""
    t = row.get("test")
    return "n/a" if not t else f"{t['ci95_pct'][0]:+.1f}%..{t['ci95_pct'][1]:+.1f}%"
