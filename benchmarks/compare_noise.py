"""`compare --fail-on-regression`'s test on real timings (issue 20, item 3): noise vs a real slowdown.

    amp-deploy build recipes/quickstart.yaml --out out/quickstart
    python benchmarks/compare_noise.py --build out/quickstart [--trials 20] [--iterations 200]

A "build" here is one latency measurement as the validate stage takes it: the original and the
pruned ONNX model on ONNX Runtime CPU at batch 8, interleaved round by round (warm-up, then timed
rounds). Per trial: the build measured twice, one run after the other (the same build measured
twice), and a build whose MLP widths were enlarged until it is about 10% slower (sliced from the
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
from amp_deploy.recipe import load_recipe  # noqa: E402


def build_row(original, model, x, iterations: int) -> dict:
    """A report row's latency_ms at batch 8: original and `model` interleaved, as validate times them."""
    lat = M.latency({"original": original, "pruned": model}, x, 10, iterations)
    return {"latency_ms": {k: {"8": v} for k, v in lat.items()}}


def enlarged(ctx: Context, growth: float, path: Path) -> Path:
    """The pruned widths grown by `growth` of the gap to the original's, exported to `path`."""
    loaded = ctx.original()
    search = ctx.folder.read_search()
    widths = [min(o, int(round(w + growth * (o - w)))) for w, o in zip(search["widths"], search["original_widths"])]
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
    a = ap.parse_args()
    ctx = Context.create(load_recipe(a.build / "recipe.yaml"), a.build)
    x = M.batch_of(ctx.data().holdout.images, 8)
    pruned = onnxruntime_runner(a.build / "pruned.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        # find the growth that makes the model about 10% slower (interleaved against the pruned model)
        chosen = None
        for growth in (0.1, 0.2, 0.3, 0.45, 0.6, 0.8):
            cand = onnxruntime_runner(enlarged(ctx, growth, Path(tmp) / f"g{growth}.onnx"))
            lat = M.latency({"p": pruned, "c": cand}, x, 10, a.iterations)
            ratio = lat["c"]["p50"] / lat["p"]["p50"]
            print(f"growth {growth:.2f}: {ratio:.3f}x the pruned model's p50 (interleaved)", flush=True)
            if ratio >= 1.10:
                chosen = (growth, cand, ratio)
                break
        if chosen is None:
            sys.exit("no enlarged model was 10% slower")
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

            p50 = lambda r: r["latency_ms"]["pruned"]["8"]["p50"]  # noqa: E731
            same, slo = judge(again), judge(slow)
            rows.append((p50(base), p50(again), p50(slow), same, slo))
            verdict = lambda t: "FAIL" if t["regression"] else "pass"  # noqa: E731
            print(f"| {t + 1} | {p50(base):.3f} | {p50(again):.3f} ({(p50(again) / p50(base) - 1) * 100:+.1f}%, "
                  f"{same[0]['p_value']:.2g}, {same[1]['p_value']:.2g}) | {verdict(same[0])} | {verdict(same[1])} | "
                  f"{p50(slow):.3f} ({(p50(slow) / p50(base) - 1) * 100:+.1f}%, {slo[0]['p_value']:.2g}, "
                  f"{slo[1]['p_value']:.2g}) | {verdict(slo[0])} | {verdict(slo[1])} |", flush=True)
    n = len(rows)
    for label, i in (("same build twice", 3), ("slower build", 4)):
        raw = sum(r[i][0]["regression"] for r in rows)
        by_ratio = sum(r[i][1]["regression"] for r in rows)
        pct = sum((r[i - 2] / r[0] - 1) * 100 > a.gate for r in rows)
        print(f"{label}: failed by the ratio test {by_ratio} of {n}, by the raw-sample test {raw}, by the p50 rule {pct}")
    print(f"(enlarged model: growth {growth:.2f} of the gap to the original widths, {ratio:.3f}x slower when chosen)")

if __name__ == "__main__":
    main()
