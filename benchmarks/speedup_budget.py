"""Pruning to a latency budget (issue 20): asked speedup vs measured, and fidelity vs a parameter budget.

    python benchmarks/speedup_budget.py --recipe recipes/dinov2_vits14_fashion.yaml --targets 1.3 1.6 \\
        --out out/speedup_real
    python benchmarks/speedup_budget.py --recipe recipes/quickstart.yaml --targets 1.2 --out out/speedup_qs

For each target T:
1. `amp-deploy build RECIPE prune.target_speedup=T` (the runtime, batch and precision of the
   recipe's prune.latency: ONNX Runtime CPU fp32 at batch 8 by default), into OUT/tT;
2. `amp-deploy build RECIPE prune.target_params=P` with P the parameter fraction the first build
   kept, into OUT/pT: the parameter budget that lands on (about) the same model size;
3. each pruned ONNX file timed against the original, two at a time, interleaved round by round (as
   validate and the search time them), repeated --repeats times: the speedup is the median over
   rounds of the per-round ratio original / pruned; the table shows the median and the spread over
   the repeats (--together: also every model in one interleaved loop);
4. each build's own fidelity from its report (k-NN top-1 / top-1 and the cosine to the original).
Run it on an idle machine: another process on these 2 cores slows both many times over.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_deploy.deploy.runtimes import onnxruntime_runner  # noqa: E402
from amp_deploy.measure import metrics as M  # noqa: E402
from amp_deploy.pipeline.context import Context  # noqa: E402
from amp_deploy.recipe import load_recipe  # noqa: E402
from benchmarks._common import print_table, write_json  # noqa: E402


def build(recipe: str, out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-c", "from amp_deploy.cli import run; run()", "build", recipe, "--out", str(out), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode not in (0, 1):  # 1: a gate failed, the report is written
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text())


def fidelity(report: dict) -> tuple[str, str]:
    f = report["fidelity"]
    if f.get("knn_top1"):
        top = f"{f['knn_top1']['pruned']:.2f} (orig {f['knn_top1']['original']:.2f})"
    else:
        top = f"{f['accuracy_pruned']:.2f} (orig {f['accuracy_original']:.2f})"
    return top, f"{f['cosine_mean']:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--targets", type=float, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--json", default=None)
    ap.add_argument("--together", action="store_true", help="also time every model in one interleaved loop")
    a = ap.parse_args()
    base = ["runtimes=[onnxruntime]", "validate.batch_sizes=[8]", "prune.target_params=null"]
    recipe = load_recipe(a.recipe, [])
    batch = recipe.prune.latency.batch
    builds = {}
    for t in a.targets:
        rep = build(a.recipe, a.out / f"t{t}", *base, f"prune.target_speedup={t}")
        frac = rep["params"]["ratio"]
        builds[t] = (rep, build(a.recipe, a.out / f"p{t}", "runtimes=[onnxruntime]", "validate.batch_sizes=[8]",
                                f"prune.target_params={frac:.4f}"))
    ctx = Context.create(recipe, a.out / f"t{a.targets[0]}")
    x = M.batch_of(ctx.data().holdout.images, batch)
    runners = {"original": onnxruntime_runner(a.out / f"t{a.targets[0]}" / "original.onnx")}
    for t in a.targets:
        runners[f"t{t}"] = onnxruntime_runner(a.out / f"t{t}" / "pruned.onnx")
        runners[f"p{t}"] = onnxruntime_runner(a.out / f"p{t}" / "pruned.onnx")
    speed: dict[str, list[float]] = {k: [] for k in runners if k != "original"}
    together: dict[str, list[float]] = {k: [] for k in speed}
    for _ in range(a.repeats):
        for k in speed:  # two runners at a time, as validate and the search time them
            stats = M.latency({"original": runners["original"], k: runners[k]}, x, 5, a.iterations)
            speed[k].append(M.median_ratio(stats["original"]["samples"], stats[k]["samples"]))
        if a.together:  # every runner in one loop (more sessions alternating: see RESULTS)
            stats = M.latency(runners, x, 5, a.iterations)
            for k in speed:
                together[k].append(M.median_ratio(stats["original"]["samples"], stats[k]["samples"]))
    rows, record = [], []
    for t in a.targets:
        for kind, rep in (("target_speedup", builds[t][0]), ("target_params", builds[t][1])):
            k = f"{'t' if kind == 'target_speedup' else 'p'}{t}"
            s = np.asarray(speed[k])
            lb = rep.get("latency_budget") or {}
            top, cos = fidelity(rep)
            asked = f"{t}x" if kind == "target_speedup" else f"{rep['prune']['target_params']:.4f} params"
            rows.append([kind, asked, f"{rep['params']['ratio']:.3f}",
                         f"{lb['predicted_speedup']:.3f}x" if lb else "", f"{lb['measured_speedup']:.3f}x" if lb else "",
                         f"{np.median(s):.3f}x ({s.min():.3f}-{s.max():.3f})",
                         f"{(np.median(s) / t - 1) * 100:+.1f}%" if lb else "",
                         f"{np.median(together[k]):.3f}x" if together[k] else "", top, cos,
                         " ".join(map(str, rep["widths"]["pruned"]))])
            record.append({"kind": kind, "target": t, "report": str(a.out / k / "report.json"), "speedups": list(s), "speedups_one_loop": together[k],
                           "params_ratio": rep["params"]["ratio"], "fidelity": rep["fidelity"].get("knn_top1")
                           or rep["fidelity"].get("accuracy_pruned"), "cosine_mean": rep["fidelity"]["cosine_mean"],
                           "widths": rep["widths"]["pruned"], "latency_budget": {k2: v for k2, v in lb.items()
                                                                                  if k2 not in ("table", "checks")}})
    print_table(["budget", "asked", "params", "predicted", "search's check", f"measured b={batch} (min-max of "
                 f"{a.repeats})", "vs target", "all in one loop", "k-NN / top-1 %", "cosine", "widths"], rows,
                f"{recipe.name}: latency budget on {recipe.prune.latency.runtime} {recipe.prune.latency.precision}, "
                f"batch {batch}")
    write_json(a.json, record)


if __name__ == "__main__":
    main()
