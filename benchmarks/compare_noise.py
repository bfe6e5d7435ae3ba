"""`compare --fail-on-regression`'s test on real timings (issue 20, item 3): noise vs a real slowdown.

    amp-deploy build recipes/quickstart.yaml --out out/quickstart
    python benchmarks/compare_noise.py --build out/quickstart [--trials 20] [--iterations 200]

A "build" here is one latency measurement of the pruned ONNX model on ONNX Runtime CPU at batch 8,
as the validate stage takes it (warm-up, then timed rounds). Per trial: the pruned model measured
twice, one run after the other (the same build measured twice), and a model whose MLP widths were
enlarged until it is about 10% slower (sliced from the original by the build's own scores, as
rebuild does), measured after them. The gate is `compare`'s own test (measure/compare.py,
change_test) at 5%: it must pass the same build in every trial and fail the slower one in every trial.
Also shown: the p50-percentage rule it replaced, on the same samples.
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
from amp_deploy.measure.compare import change_test  # noqa: E402
from amp_deploy.pipeline.context import Context  # noqa: E402
from amp_deploy.prune.rebuild import apply_widths  # noqa: E402
from amp_deploy.recipe import load_recipe  # noqa: E402


def samples(runner, x, iterations: int) -> list[float]:
    return M.latency({"m": runner}, x, 10, iterations)["m"]["samples"]


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
        rows = []
        for t in range(a.trials):
            base = samples(pruned, x, a.iterations)
            again = samples(pruned, x, a.iterations)
            slow = samples(slower, x, a.iterations)
            same_t, slow_t = change_test(base, again, a.gate), change_test(base, slow, a.gate)
            p50 = lambda s: float(np.median(s))  # noqa: E731
            rows.append((t, p50(base), p50(again), p50(slow), same_t, slow_t))
            print(f"| {t + 1} | {p50(base):.3f} | {p50(again):.3f} ({(p50(again) / p50(base) - 1) * 100:+.1f}%, "
                  f"p {same_t['p_value']:.2g}) | {'FAIL' if same_t['regression'] else 'pass'} | {p50(slow):.3f} "
                  f"({(p50(slow) / p50(base) - 1) * 100:+.1f}%, p {slow_t['p_value']:.2g}) | "
                  f"{'FAIL' if slow_t['regression'] else 'pass'} |", flush=True)
    same_fail = sum(r[4]["regression"] for r in rows)
    slow_fail = sum(r[5]["regression"] for r in rows)
    pct_same = sum((r[2] / r[1] - 1) * 100 > a.gate for r in rows)
    pct_slow = sum((r[3] / r[1] - 1) * 100 > a.gate for r in rows)
    print(f"\nenlarged model: growth {growth:.2f} of the gap to the original widths, {ratio:.3f}x slower when chosen")
    print(f"same build twice: the test failed {same_fail} of {len(rows)} (the p50 rule: {pct_same})")
    print(f"slower build:     the test failed {slow_fail} of {len(rows)} (the p50 rule: {pct_slow})")


if __name__ == "__main__":
    main()
