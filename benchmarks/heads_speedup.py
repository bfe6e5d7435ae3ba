"""MLP-only against joint (MLP and heads) pruning at the same latency budget (issue 28).

    python benchmarks/heads_speedup.py --recipe recipes/dinov2_vits14_fashion.yaml --targets 1.6 2.0 \\
        --out out/heads_speed [--distill-epochs 2] [--int8] [--size 224] [--reuse]

For each target T and each method (`mlp`: the authors' AMP, widths only; `joint`: `prune.heads=true`):
1. `amp-deploy build RECIPE prune.target_speedup=T` on the recipe's `prune.latency` (ONNX Runtime CPU
   fp32 at batch 8 by default; `--int8`: ONNX Runtime INT8, the build's own QDQ file timed, the target
   over the fp32 original, `prune.latency.baseline=fp32`), with
   `distill.epochs` = `--distill-epochs`, into OUT/<method>-T. A target the method cannot reach is
   refused by the build with what it reaches; the row says so.
2. Every pruned file timed against the ORIGINAL model on ONNX Runtime fp32, two at a time, interleaved
   round by round (settled calls), `--repeats` times: the speedup is the median of per-round ratios
   (median of the repeats, and their range).
3. Fidelity on the build's holdout, before distillation (pruned.before_distill.safetensors) and after:
   cosine of the embedding to the original's, the search's divergence (image-image, inverse temperature
   of the recipe, batches of 128) and k-NN top-1 (bank: the calibration images), from the same models.
`--set KEY=VALUE ...`: recipe overrides for every build (`prune.compensate=none distill.loss=output`: the
method before compensation and token distillation).
`--size 224`: the same weights (original and each pruned model) exported again at 224x224 (DINOv2
interpolates its position embeddings) and timed there the same way (fp32). Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_deploy.checkpoint import load_pruned_model  # noqa: E402
from amp_deploy.deploy.runtimes import onnxruntime_runner  # noqa: E402
from amp_deploy.measure import metrics as M  # noqa: E402
from amp_deploy.pipeline.context import Context  # noqa: E402
from amp_deploy.prune.score import Divergence  # noqa: E402
from amp_deploy.recipe import load_recipe  # noqa: E402
from benchmarks._common import print_table, write_json  # noqa: E402

METHODS = {"mlp": "prune.heads=false", "joint": "prune.heads=true"}


def build(recipe: str, out: Path, overrides: list[str], reuse: bool) -> tuple[dict | None, str]:
    """The build's report, or None and the one-line reason it was refused."""
    if reuse and (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text()), ""
    cmd = [sys.executable, "-c", "from amp_deploy.cli import run; run()", "build", recipe, "--out", str(out), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode == 2:
        said = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("error:")]
        return None, said[-1] if said else "refused"
    if res.returncode not in (0, 1):  # 1: a gate failed, the report is written
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text()), ""


def divergence(ref: torch.Tensor, out: torch.Tensor, temperature: float, batch: int = 128) -> float:
    loss = Divergence("image-image", temperature)
    total = sum(loss(out[i:i + batch], None, ref[i:i + batch]).double().sum().item() for i in range(0, len(ref), batch))
    return total / len(ref)


def fidelity(ctx: Context, folder: Path, ref: torch.Tensor) -> dict:
    """Before and after distillation: cosine, divergence, k-NN top-1 of the pruned model on the holdout."""
    data, bs, cpu = ctx.data(), ctx.recipe.data.batch_size, torch.device("cpu")
    t = ctx.recipe.prune.temperature or 20.0
    out = {}
    files = {"after": folder / "pruned.safetensors"}
    if (folder / "pruned.before_distill.safetensors").is_file():
        files["before"] = folder / "pruned.before_distill.safetensors"
    for when, path in files.items():
        model = load_pruned_model(path).model.cpu().eval()
        got = M.predict(model, data.holdout, bs, cpu)
        bank, labels = M.predict_labelled(model, data.calibration, bs, cpu)
        out[when] = {"cosine": M.agreement(ref, got)["cosine_mean"], "divergence": divergence(ref, got, t),
                     "knn": M.knn_top1(bank, labels, got, data.holdout.labels)}
    if "before" not in out:
        out["before"] = out["after"]  # no distillation: the same model
    return out


def speedups(base, runners: dict, x, iterations: int, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, r in runners.items():
            st = M.latency({"base": base, k: r}, x, 5, iterations)
            out[k].append(M.median_ratio(st["base"]["samples"], st[k]["samples"]))
    return out


def exported_at(ctx: Context, models: dict, size: int, work: Path) -> dict[str, Path]:
    from amp_deploy.deploy.export import export_onnx

    e = ctx.recipe.export
    return {k: export_onnx(m.float(), work / f"{k}.onnx", (3, size, size), opset=e.opset, batch_min=1, batch_opt=8,
                           batch_max=32, exporter=e.exporter) for k, m in models.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--targets", type=float, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--distill-epochs", type=int, default=0)
    ap.add_argument("--int8", action="store_true", help="the budget on ONNX Runtime INT8 (its QDQ file timed)")
    ap.add_argument("--size", type=int, default=None, help="also time every model re-exported at this size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--reuse", action="store_true", help="keep builds that have a report.json")
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides for every build (e.g. prune.compensate=none "
                                                        "distill.loss=output: the method before compensation)")
    a = ap.parse_args()
    base = ["runtimes=[onnxruntime]", "validate.batch_sizes=[8]", "prune.target_params=null",
            f"distill.epochs={a.distill_epochs}", *a.set]
    if a.int8:
        base += ["prune.latency.precision=int8", "prune.latency.baseline=fp32", "quantize.formats=[onnxruntime-int8]"]
    recipe = load_recipe(a.recipe, a.set)
    builds: dict[str, tuple[dict | None, str]] = {}
    reach: dict[str, float] = {}  # per method, the reach a finished build's table measured (same machine)
    for t in sorted(a.targets):
        for m in a.methods:
            if m in reach and t > reach[m]:  # the table already measured says no: not built again
                builds[f"{m}-{t}"] = (None, f"out of reach: the latency table of {m}-{max(x for x in a.targets if x < t)}"
                                            f" predicts at most {reach[m]:.3g}x")
                continue
            builds[f"{m}-{t}"] = build(a.recipe, a.out / f"{m}-{t}", [*base, METHODS[m], f"prune.target_speedup={t}"],
                                       a.reuse)
            if builds[f"{m}-{t}"][0] is not None:
                reach[m] = builds[f"{m}-{t}"][0]["latency_budget"]["max_speedup"]
    done = [k for k, (rep, _) in builds.items() if rep is not None]
    if not done:
        sys.exit("no build finished: " + "; ".join(f"{k}: {why}" for k, (_, why) in builds.items()))
    ctx = Context.create(recipe, a.out / done[0])
    data, cpu = ctx.data(), torch.device("cpu")
    original = ctx.original().model.cpu().eval()
    ref = M.predict(original, data.holdout, recipe.data.batch_size, cpu)
    fid = {k: fidelity(ctx, a.out / k, ref) for k in done}
    batch = recipe.prune.latency.batch
    x = M.batch_of(data.holdout.images, batch)
    pruned_file = "pruned.onnxruntime-int8.onnx" if a.int8 else "pruned.onnx"
    base_runner = onnxruntime_runner(a.out / done[0] / "original.onnx")
    speed = speedups(base_runner, {k: onnxruntime_runner(a.out / k / pruned_file) for k in done}, x, a.iterations,
                     a.repeats)
    speed_at: dict[str, list[float]] = {}
    if a.size:
        with tempfile.TemporaryDirectory() as tmp:
            models = {"original": original, **{k: load_pruned_model(a.out / k / "pruned.safetensors").model for k in done}}
            files = exported_at(ctx, models, a.size, Path(tmp))
            import torch.nn.functional as F

            xs = F.interpolate(torch.as_tensor(x).float(), size=(a.size, a.size), mode="bilinear",
                               align_corners=False).numpy()
            speed_at = speedups(onnxruntime_runner(files["original"]),
                                {k: onnxruntime_runner(files[k]) for k in done}, xs, max(5, a.iterations // 3),
                                a.repeats)
    rows, record = [], []
    for k, (rep, why) in builds.items():
        m, t = k.split("-")
        if rep is None:
            rows.append([m, f"{t}x", why[:120], *[""] * 11])
            record.append({"build": k, "refused": why})
            continue
        lb, s = rep["latency_budget"], np.asarray(speed[k])
        heads = rep.get("heads") or {}
        kept = f"{sum(heads['pruned'])} of {sum(heads['original'])}" if heads.get("pruned") else "all"
        b, f = fid[k]["before"], fid[k]["after"]
        rows.append([m, f"{t}x", f"{rep['params']['ratio']:.3f}", kept, f"{lb['measured_speedup']:.3f}x",
                     f"{np.median(s):.3f}x ({s.min():.3f}-{s.max():.3f})",
                     f"{np.median(speed_at[k]):.3f}x" if speed_at else "",
                     f"{b['cosine']:.4f}", f"{b['divergence']:.4f}", f"{b['knn']:.2f}",
                     f"{f['cosine']:.4f}" if a.distill_epochs else "", f"{f['divergence']:.4f}" if a.distill_epochs else "",
                     f"{f['knn']:.2f}" if a.distill_epochs else "",
                     f"{json.loads((a.out / k / 'search.json').read_text())['seconds']:.0f}"])
        record.append({"build": k, "report": str(a.out / k / "report.json"), "speedups": list(s),
                       f"speedups_{a.size}": speed_at.get(k), "fidelity": fid[k], "widths": rep["widths"]["pruned"],
                       "heads": heads.get("pruned"), "params_ratio": rep["params"]["ratio"],
                       "latency_budget": {k2: v for k2, v in lb.items() if k2 not in ("table", "checks", "curves")}})
    orig_knn = M.knn_top1(*M.predict_labelled(original, data.calibration, recipe.data.batch_size, cpu), ref,
                          data.holdout.labels)
    lat = recipe.prune.latency
    print_table(["method", "asked", "params", "heads kept", "search's check", f"measured b={batch} (range of "
                 f"{a.repeats})", f"at {a.size}" if a.size else "-", "cosine", "divergence", "k-NN %",
                 "distilled cosine", "divergence", "k-NN %", "search s"], rows,
                f"{recipe.name}: latency budget on {lat.runtime} {'int8' if a.int8 else lat.precision}, batch {batch}, "
                f"timed against the original on ONNX Runtime fp32; original k-NN {orig_knn:.2f}")
    write_json(a.json, record)


if __name__ == "__main__":
    main()
