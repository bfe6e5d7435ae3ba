"""`amp-deploy compare`: reports side by side, and a regression gate for CI.

The first report is the baseline. For every runtime and batch size measured in the baseline and
in another report, p50, p99 and throughput are compared. The gate is a statistical test on the
timing samples each report keeps, with the gate's percentage as the effect size: a pruned model is
a regression when its latencies are larger than the baseline's scaled by (1 + PCT/100), by a
one-sided Mann-Whitney U test at p < 0.01 (the change's 95% bootstrap interval of the ratio of
medians is shown beside it). The pruned model's samples are taken as ratios to the original's in
the same timed round (the validate stage interleaves the two, so each round's pair ran back to
back): a machine that is slower as a whole during one build's run moves both and not their ratio.
On this project's shared 2-core VM such drift between runs reached 2x (benchmarks/compare_noise.py),
which no test of raw samples can tell from a regression. The price: a slowdown of the runtime
itself that hits original and pruned alike is not a regression of the build (the original's raw
change is shown in its own rows). Reports without samples (before samples were kept) fall back to
comparing the two p50s, with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amp_deploy.errors import UserError
from amp_deploy.measure.report import SCHEMA
from amp_deploy.prune.shape import from_json, from_report, heads_of, to_json, widths_of

ALPHA = 0.01  # the regression test's significance level
BOOTSTRAP = 2000  # resamples for the interval of the change


def change_test(a: list[float], b: list[float], pct: float | None, alpha: float = ALPHA, seed: int = 0) -> dict[str, Any]:
    """Is B slower than A by more than `pct` percent? A one-sided Mann-Whitney U test of B's samples
    against A's scaled by (1 + pct/100), and the 95% bootstrap interval of median(B) / median(A) - 1.

    Returns {"ci95_pct": [lo, hi], "p_value": p or None, "regression": bool}.
    """
    import numpy as np
    from scipy.stats import mannwhitneyu

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    ma = np.median(xa[rng.integers(0, len(xa), (BOOTSTRAP, len(xa)))], axis=1)
    mb = np.median(xb[rng.integers(0, len(xb), (BOOTSTRAP, len(xb)))], axis=1)
    lo, hi = np.percentile(mb / ma - 1.0, [2.5, 97.5]) * 100
    out: dict[str, Any] = {"ci95_pct": [float(lo), float(hi)], "p_value": None, "regression": False,
                           "rounds": [len(xa), len(xb)]}
    if pct is not None:
        p = float(mannwhitneyu(xb, xa * (1 + pct / 100), alternative="greater").pvalue)
        out.update(p_value=p, regression=p < alpha, smallest_p=smallest_p(len(xb), len(xa)))
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


def smallest_p(n: int, m: int) -> float:
    """The smallest p-value the one-sided Mann-Whitney U test can give with n and m samples (every
    sample of one larger than every sample of the other)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu([2.0 + i for i in range(n)], [-1.0 - i for i in range(m)], alternative="greater").pvalue)


def rounds_to_judge(alpha: float = ALPHA) -> int:
    """The fewest timed rounds per report (validate.iterations) with which the test can reach p < alpha."""
    n = 2
    while smallest_p(n, n) >= alpha:
        n += 1
    return n


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
    """The regression gate over the pruned rows: a regression, or a row it could not judge."""
    need = rounds_to_judge()
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
            continue
        if t["regression"]:
            regressions.append(f"{where}, 95% CI {t['ci95_pct'][0]:+.1f}%..{t['ci95_pct'][1]:+.1f}%; slower by more "
                               f"than {pct:g}% at p = {t['p_value']:.2g} < {ALPHA:g})")
        elif t["smallest_p"] >= ALPHA:
            undecided.append(f"{where}): {t['rounds'][0]} and {t['rounds'][1]} timed rounds can never reach "
                             f"p < {ALPHA:g} (smallest p {t['smallest_p']:.3g}); at least {need} rounds per report "
                             f"(validate.iterations >= {need}) resolve the test")
    wide = [f"{r['report']} {r['runtime']} batch {r['batch']} ({ci_text(r)})" for r in rows
            if r["model"] == "pruned" and r["test"]
            and (r["test"]["ci95_pct"][1] - r["test"]["ci95_pct"][0]) / 2 > pct]
    if wide:
        warnings.append(f"the 95% interval of the change is wider than the gate's {pct:g}% for "
                        f"{', '.join(wide)}: a slowdown of that size may go unnoticed; more validate.iterations "
                        "(or a quieter machine) resolve it")
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
