"""INT8 on ONNX Runtime CPU after pruning, on a finished build of a real model (issue 19).

    amp-deploy build recipes/dinov2_vits14_fashion.yaml --out out/real_q07 prune.target_params=0.7 \\
        'runtimes=[onnxruntime,tensorrt]' 'quantize.formats=[onnxruntime-int8,tensorrt-int8,tensorrt-fp8]'
    python benchmarks/quantize_real.py --build out/real_q07 [--choices]

Two tables, every figure measured in this run:
1. (--choices) How ONNX Runtime's quantizer is best set for a ViT: calibration method x which
   operators are quantized x activation type, each on the pruned model: parity with its fp32 model,
   k-NN top-1 and p50 at batch 8 interleaved with the fp32 model. The recipe defaults
   (quantize.method, quantize.op_types, quantize.activations) come from this table.
2. Original fp32, pruned fp32, original INT8 and pruned INT8 (the build's own quantized files), each
   timed against the original fp32, two at a time, interleaved, --repeats times, at batch 1, 8 and 32:
   median p50 and median per-round speedup over the original fp32,
   k-NN top-1 (bank: the calibration images through the same model; holdout: the build's holdout,
   with its binomial standard error) and cosine to the original fp32 model.
Run it on an idle machine: another process on these 2 cores slows both many times over.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_deploy.deploy import quantize as Q  # noqa: E402
from amp_deploy.deploy.runtimes import onnxruntime_runner  # noqa: E402
from amp_deploy.measure import metrics as M  # noqa: E402
from amp_deploy.measure.validation import RunnerModel  # noqa: E402
from amp_deploy.pipeline.context import Context  # noqa: E402
from amp_deploy.recipe import load_recipe  # noqa: E402


def features(runner, data, batch_size, batch_range):
    """(bank features, bank labels, holdout outputs) of one runner."""
    model = RunnerModel(runner, batch_range)
    bank, labels = M.predict_labelled(model, data.calibration, batch_size, torch.device("cpu"))
    return bank, labels, model(data.holdout.images)


def se_points(acc: float, n: int) -> float:
    """The binomial standard error of a top-1 figure, in points."""
    p = acc / 100
    return 100 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def choices(build: Path, ctx: Context, iterations: int) -> None:
    data, bs, b = ctx.data(), ctx.recipe.data.batch_size, ctx.recipe.export.batch
    reader = Q.CalibrationReader(Q.calibration_batches(data.calibration.batches(bs), ctx.recipe.quantize.calibration,
                                                       b.max))
    fp32 = onnxruntime_runner(build / "pruned.onnx")
    ref = RunnerModel(fp32, (b.min, b.max))(data.holdout.images)
    x8 = M.batch_of(data.holdout.images, 8)
    print(f"\n## ONNX Runtime INT8 settings, pruned model ({reader.__len__()} calibration images)\n")
    print("| method | operators | activations | cosine mean | cosine min | k-NN top-1 % | p50 b=8 ms | vs fp32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    ops_sets = {"MatMul+Gemm+Conv": list(Q.DEFAULT_ORT_OPS), "all (ONNX Runtime's default)": None}
    with tempfile.TemporaryDirectory() as tmp:
        for method, (ops_name, ops), act in itertools.product(("minmax", "entropy", "percentile"), ops_sets.items(),
                                                              ("uint8", "int8")):
            path = Path(tmp) / "q.onnx"
            Q.quantize_onnxruntime(build / "pruned.onnx", path, reader, method=method, activation=act, op_types=ops)
            r = onnxruntime_runner(path)
            bank, labels, out = features(r, data, bs, (b.min, b.max))
            agree = M.agreement(ref, out)
            knn = M.knn_top1(bank, labels, out, data.holdout.labels)
            lat = M.latency({"fp32": fp32, "int8": r}, x8, 5, iterations)
            print(f"| {method} | {ops_name} | {act} | {agree['cosine_mean']:.4f} | {agree['cosine_min']:.4f} | "
                  f"{knn:.2f} | {lat['int8']['p50']:.2f} | {lat['fp32']['p50'] / lat['int8']['p50']:.2f}x |",
                  flush=True)


def acceptance(build: Path, ctx: Context, iterations: int, repeats: int = 3) -> None:
    data, bs, b = ctx.data(), ctx.recipe.data.batch_size, ctx.recipe.export.batch
    files = {"original fp32": "original.onnx", "pruned fp32": "pruned.onnx",
             "original int8": "original.onnxruntime-int8.onnx", "pruned int8": "pruned.onnxruntime-int8.onnx"}
    runners = {k: onnxruntime_runner(build / f) for k, f in files.items()}
    measured = {k: features(r, data, bs, (b.min, b.max)) for k, r in runners.items()}
    n = len(data.holdout)
    knn = {k: M.knn_top1(bank, lab, out, data.holdout.labels) for k, (bank, lab, out) in measured.items()}
    ref = measured["original fp32"][2]
    # each model against the original fp32, two at a time (a loop of four models compresses the ratios:
    # RESULTS, latency budget section), `repeats` times; speedup: median of the per-round ratios
    others = [k for k in files if k != "original fp32"]
    speed = {bb: {k: [] for k in others} for bb in (1, 8, 32)}
    p50 = {bb: {k: [] for k in files} for bb in (1, 8, 32)}
    for bb in (1, 8, 32):
        x = M.batch_of(data.holdout.images, bb)
        for _ in range(repeats):
            for k in others:
                st = M.latency({"original fp32": runners["original fp32"], k: runners[k]}, x, 5, iterations)
                speed[bb][k].append(M.median_ratio(st["original fp32"]["samples"], st[k]["samples"]))
                p50[bb][k].append(st[k]["p50"])
                p50[bb]["original fp32"].append(st["original fp32"]["p50"])
    sizes = {k: (build / f).stat().st_size for k, f in files.items()}
    print(f"\n## Pruned + INT8 vs the original, ONNX Runtime CPU ({n} holdout images, "
          f"bank {len(measured['original fp32'][1])})\n")
    print("| model | file MB | k-NN top-1 % (SE) | cosine to original | p50 b=1 ms | p50 b=8 ms | p50 b=32 ms | "
          "speedup b=1 | b=8 | b=32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in files:
        cos = M.agreement(ref, measured[k][2])["cosine_mean"]
        ms = [float(np.median(p50[bb][k])) for bb in (1, 8, 32)]
        sp = [float(np.median(speed[bb][k])) if k in others else 1.0 for bb in (1, 8, 32)]
        print(f"| {k} | {sizes[k] / 1e6:.1f} | {knn[k]:.2f} ({se_points(knn[k], n):.2f}) | {cos:.4f} | "
              + " | ".join(f"{v:.2f}" for v in ms) + " | " + " | ".join(f"{v:.2f}x" for v in sp) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", type=Path, required=True, help="a finished build folder with onnxruntime-int8")
    ap.add_argument("--choices", action="store_true", help="also the ONNX Runtime settings table")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="timings of each pair (median shown)")
    a = ap.parse_args()
    recipe = load_recipe(a.build / "recipe.yaml")
    ctx = Context.create(recipe, a.build)
    start = time.time()
    acceptance(a.build, ctx, a.iterations, a.repeats)
    if a.choices:
        choices(a.build, ctx, a.iterations)
    print(f"\n({time.time() - start:.0f} s; {M.KNN_METHOD})")


if __name__ == "__main__":
    main()
