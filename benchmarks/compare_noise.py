"""`compare --fail-on-regression`'s test on real timings (issue 20, item 3): noise vs a real slowdown.

    amp-deploy build recipes/quickstart.yaml --out out/quickstart
    python benchmarks/compare_noise.py --build out/quickstart [--trials 20] [--iterations 200]

A "build" here is one latency measurement as the validate stage takes it: the original and the
pruned ONNX model on ONNX Runtime CPU at batch 8, interleaved round by round (warm-up, then timed
rounds). Per trial: the build measured twice, one run after the other (the same build measured
twice), and a build whose MLP widths were enlarged until it is 10% slower (bisected, within 1%) (sliced from the
original by the build's own scores, as rebuild does), measured after them. Judged by `compare`'s
own test at 5% (measure/compare.py): on the raw samples, and on the per-round ratios to the
original (what `compare` uses); it must pass the same build and fail the slower one in every trial.
Also shown: the p50-percentage rule it replaced.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_deploy.deploy.runtimes import onnxruntime_runner  # noqa: E402
from amp_deploy.measure import metrics as M  # noqa: E402
from amp_deploy.measure.compare import change_test, round_ratios  # noqa: E402
from amp_deploy.pipeline.context import Context  # noqa: E402
from amp_deploy.prune.rebuild import apply_widths  # noqa: E402
from amp_deploy.prune.shape import recorded_shapes  # noqa: E402
from amp_deploy.recipe import load_recipe  # noqa: E402


def build_row(original, model, x, iterations: int) -> dict:
    """A report row's latency_ms at batch 8: original and `model` interleaved, as validate times them."""
    lat = M.latency({"original": original, "pruned": model}, x, 10, iterations)
    return {"latency_ms": {k: {"8": v} for k, v in lat.items()}}


def p50(row: dict) -> float:
    return row["latency_ms"]["pruned"]["8"]["p50"]


def ratio_to(row: dict) -> float:
    """The pruned model's median per-round ratio to the original in one build's row."""
    return float(np.median(round_ratios(row, "pruned", "8")))


def enlarged(ctx: Context, growth: float, path: Path) -> Path:
    """The pruned widths grown by `growth` of the gap to the original's, exported to `path`."""
    loaded = ctx.original()
    shapes, original = recorded_shapes(ctx.folder.read_search())
    widths = [min(o.width, int(round(s.width + growth * (o.width - s.width)))) for s, o in zip(shapes, original)]
    apply_widths(loaded, ctx.folder.read_scores(ctx.recipe.prune.taylor), widths)
    loaded.model.cpu().float().eval()
    from amp_deploy.deploy.export import export_onnx

    e = ctx.recipe.export
    return export_onnx(loaded.model, path, loaded.input_size, opset=e.opset, batch_min=e.batch.min,
                       batch_opt=e.batch.opt, batch_max=e.batch.max, exporter=e.exporter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--gate", type=float, default=5.0)
    ap.add_argument("--slowdown", type=float, default=1.10, help="how much slower the enlarged build is made")
    ap.add_argument("--within", type=float, default=0.01, help="accepted miss of --slowdown when it is chosen")
    a = ap.parse_args()
    ctx = Context.create(load_recipe(a.build / "recipe.yaml"), a.build)
    x = M.batch_of(ctx.data().holdout.images, 8)
    pruned = onnxruntime_runner(a.build / "pruned.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        # bisect the growth until the model is 10% slower than the pruned one (interleaved, within --within)
        lo, hi, chosen = 0.0, 1.0, None
        for _ in range(8):
            growth = (lo + hi) / 2
            cand = onnxruntime_runner(enlarged(ctx, growth, Path(tmp) / f"g{growth:.4f}.onnx"))
            lat = M.latency({"p": pruned, "c": cand}, x, 10, a.iterations)
            ratio = M.median_ratio(lat["c"]["samples"], lat["p"]["samples"])
            print(f"growth {growth:.3f}: {ratio:.3f}x the pruned model (median per-round ratio)", flush=True)
            if chosen is None or abs(ratio - a.slowdown) < abs(chosen[2] - a.slowdown):
                chosen = (growth, cand, ratio)
            if abs(ratio - a.slowdown) <= a.within:
                break
            lo, hi = (growth, hi) if ratio < a.slowdown else (lo, growth)
        growth, slower, ratio = chosen
        original = onnxruntime_runner(a.build / "original.onnx")
        rows = []
        print("| trial | A p50 | A again (change, p raw, p ratio) | raw | ratio | B slower (change, p raw, p ratio) | raw "
              "| ratio |\n|---:|---:|---|---|---|---|---|---|")
        for t in range(a.trials):
            base, again, slow = (build_row(original, m, x, a.iterations) for m in (pruned, pruned, slower))

            def judge(other):
                raw = change_test(base["latency_ms"]["pruned"]["8"]["samples"],
                                  other["latency_ms"]["pruned"]["8"]["samples"], a.gate)
                ratio = change_test(round_ratios(base, "pruned", "8"), round_ratios(other, "pruned", "8"), a.gate)
                return raw, ratio

            same, slo = judge(again), judge(slow)
            rows.append((base, again, slow, same, slo))
            verdict = lambda t: {"regression": "FAIL", "pass": "pass"}.get(t["verdict"], "undecided")  # noqa: E731
            ci = lambda t: f"{t['ci95_pct'][0]:+.1f}..{t['ci95_pct'][1]:+.1f}%"  # noqa: E731
            print(f"| {t + 1} | {p50(base):.3f} | {p50(again):.3f} ({(p50(again) / p50(base) - 1) * 100:+.1f}%, "
                  f"{ci(same[0])}, {ci(same[1])}) | {verdict(same[0])} | {verdict(same[1])} | "
                  f"{p50(slow):.3f} ({(p50(slow) / p50(base) - 1) * 100:+.1f}%, {ci(slo[0])}, "
                  f"{ci(slo[1])}) | {verdict(slo[0])} | {verdict(slo[1])} |", flush=True)
    n = len(rows)
    for label, i in (("same build twice", 3), ("slower build", 4)):
        raw = sum(r[i][0]["regression"] for r in rows)
        by_ratio = sum(r[i][1]["regression"] for r in rows)
        pct = sum((p50(r[i - 2]) / p50(r[0]) - 1) * 100 > a.gate for r in rows)
        print(f"{label}: failed by the ratio test {by_ratio} of {n}, by the raw-sample test {raw}, by the p50 rule {pct}")
    realised = np.median([ratio_to(r[2]) / ratio_to(r[0]) for r in rows]) if rows else float("nan")
    print(f"(enlarged model: growth {growth:.3f} of the gap to the original widths, {ratio:.3f}x slower when chosen, "
          f"{realised:.3f}x over the trials: median of its p50 ratio to the original over the same build's)")

if __name__ == "__main__":
    main()
