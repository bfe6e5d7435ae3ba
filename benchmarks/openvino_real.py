"""OpenVINO against ONNX Runtime on the CPU, on finished builds of a real model (issue 27).

    amp-deploy build recipes/dinov2_vits14_fashion.yaml --out out/real_ov07 prune.target_params=0.7 \\
        'runtimes=[onnxruntime,openvino,openvino-bf16]' 'quantize.formats=[onnxruntime-int8,openvino-int8]'
    python benchmarks/openvino_real.py --build out/real_ov07 [--size 224] [--nncf-choices]

Every row is one model on one runtime and precision, timed against ONNX Runtime fp32 of the
ORIGINAL model, two runners at a time, interleaved round by round (settled calls), `--repeats`
times at batch 1, 8 and 32; the speedup is the median of the per-round ratios. Fidelity: cosine to
the original fp32 model and k-NN top-1 (bank: the calibration images through the same runner;
holdout: the build's holdout), and parity: cosine to the fp32 model the row came from.

`--size 224`: the build's original and pruned weights (pruned.safetensors) are exported again at
224x224 (DINOv2 interpolates its position embeddings), converted and quantized here (INT8
calibrated on the build's calibration images at 224), and timed the same way; no k-NN there (the
images are 28x28 Fashion-MNIST upsampled, the point is the runtime's speed at the size users serve).
`--nncf-choices`: NNCF's model type (transformer vs default) on the pruned model, by cosine and
speed. Run on an idle machine: another process on these 2 cores slows both many times over.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_deploy.deploy import openvino as OV  # noqa: E402
from amp_deploy.deploy import quantize as Q  # noqa: E402
from amp_deploy.deploy.runtimes import onnxruntime_runner, openvino_runner  # noqa: E402
from amp_deploy.measure import metrics as M  # noqa: E402
from amp_deploy.measure.validation import RunnerModel  # noqa: E402
from amp_deploy.pipeline.context import Context  # noqa: E402
from amp_deploy.recipe import load_recipe  # noqa: E402

BATCHES = [1, 8, 32]  # --batches replaces it


def rows_of(folder: Path, threads: int | None) -> dict[str, tuple]:
    """Row name -> (opener, the fp32 row it came from)."""
    ort = lambda p: lambda: onnxruntime_runner(p, threads)  # noqa: E731
    ovr = lambda p, prec: lambda: openvino_runner(p, threads, prec)  # noqa: E731
    out = {}
    for k in ("original", "pruned"):
        ref = f"{k} onnxruntime fp32"
        out[ref] = (ort(folder / f"{k}.onnx"), ref)
        if (folder / f"{k}.onnxruntime-int8.onnx").is_file():
            out[f"{k} onnxruntime int8"] = (ort(folder / f"{k}.onnxruntime-int8.onnx"), ref)
        out[f"{k} openvino fp32"] = (ovr(folder / f"{k}.xml", "fp32"), ref)
        if OV.bf16_problem() is None:
            out[f"{k} openvino bf16"] = (ovr(folder / f"{k}.xml", "bf16"), ref)
        if (folder / f"{k}.openvino-int8.xml").is_file():
            out[f"{k} openvino int8"] = (ovr(folder / f"{k}.openvino-int8.xml", "fp32"), ref)
    return out


def timed(rows: dict, x_of, iterations: int, repeats: int) -> dict:
    """Per row and batch: the median per-round speedup over original ORT fp32, and the median p50."""
    base = rows["original onnxruntime fp32"][0]()
    out: dict = {}
    for name, (opener, _) in rows.items():
        if name == "original onnxruntime fp32":
            continue
        r = opener()
        for b in BATCHES:
            x = x_of(b)
            sp, ms, ms0 = [], [], []
            for _ in range(repeats):
                st = M.latency({"base": base, name: r}, x, 5, iterations)
                sp.append(M.median_ratio(st["base"]["samples"], st[name]["samples"]))
                ms.append(st[name]["p50"])
                ms0.append(st["base"]["p50"])
            out.setdefault(name, {})[b] = (float(np.median(sp)), float(np.median(ms)))
            out.setdefault("original onnxruntime fp32", {})[b] = (1.0, float(np.median(ms0)))
        del r
    return out


def fidelity(rows: dict, ctx: Context, knn: bool) -> dict:
    data, bs, b = ctx.data(), ctx.recipe.data.batch_size, ctx.recipe.export.batch
    outs, banks = {}, {}
    for name, (opener, _) in rows.items():
        model = RunnerModel(opener(), (b.min, b.max))
        outs[name] = model(data.holdout.images)
        if knn:
            banks[name] = M.predict_labelled(model, data.calibration, bs, torch.device("cpu"))
    ref = outs["original onnxruntime fp32"]
    res = {}
    for name, (_, parent) in rows.items():
        parity = M.agreement(outs[parent], outs[name])
        res[name] = {"cosine": M.agreement(ref, outs[name])["cosine_mean"], "parity": parity["cosine_min"],
                     "parity_mean": parity["cosine_mean"]}
        if knn:
            bank, labels = banks[name]
            res[name]["knn"] = M.knn_top1(bank, labels, outs[name], data.holdout.labels)
    return res


def export_at(build: Path, ctx: Context, size: int, work: Path, calibration: int | None = None) -> Path:
    """The build's original and pruned models exported at size x size, converted, and INT8 by both
    quantizers (calibrated on the build's calibration images at that size)."""
    import torch.nn.functional as F

    from amp_deploy.checkpoint import load_pruned_model
    from amp_deploy.deploy.export import export_onnx

    models = {"original": ctx.original().model.cpu().eval(), "pruned": load_pruned_model(build / "pruned.safetensors").model}
    e, q = ctx.recipe.export, ctx.recipe.quantize
    calib = [F.interpolate(xb.float(), size=(size, size), mode="bilinear", align_corners=False)
             for xb, _ in ctx.data().calibration.batches(32)]
    batches = Q.calibration_batches(((c, None) for c in calib), calibration or q.calibration, e.batch.max)
    reader = Q.CalibrationReader(batches)
    for k, m in models.items():
        onnx_path = export_onnx(m.float(), work / f"{k}.onnx", (3, size, size), opset=e.opset, batch_min=1,
                                batch_opt=8, batch_max=32, exporter=e.exporter)
        OV.convert_onnx(onnx_path, work / f"{k}.xml")
        Q.quantize_onnxruntime(onnx_path, work / f"{k}.onnxruntime-int8.onnx", reader, method=q.method,
                               per_channel=q.per_channel, op_types=q.op_types, activation=q.activations)
        reader.rewind()
        OV.quantize_nncf(onnx_path, work / f"{k}.openvino-int8.xml", batches, model_type=q.openvino_model_type)
    return work


def print_rows(title: str, fid: dict, speed: dict, knn: bool) -> None:
    print(f"\n## {title}\n")
    head = "| model | runtime, precision | cosine to original | parity: cosine to its fp32, mean / min |"
    head += " k-NN top-1 % |" if knn else ""
    print(head + " " + " | ".join(f"p50 b={b} ms" for b in BATCHES) + " | "
          + " | ".join(f"speedup b={b}" for b in BATCHES) + " |")
    print("|---|---|---:|---:|" + ("---:|" if knn else "") + "---:|" * (2 * len(BATCHES)))
    for name, f in fid.items():
        model, rt = name.split(" ", 1)
        cells = [f"{f['cosine']:.4f}", f"{f['parity_mean']:.5f} / {f['parity']:.5f}"] + ([f"{f['knn']:.2f}"] if knn else [])
        cells += [f"{speed[name][b][1]:.2f}" for b in BATCHES] + [f"{speed[name][b][0]:.2f}x" for b in BATCHES]
        print(f"| {model} | {rt} | " + " | ".join(cells) + " |", flush=True)


def nncf_choices(build: Path, ctx: Context, iterations: int, threads: int | None) -> None:
    data, e = ctx.data(), ctx.recipe.export
    batches = Q.calibration_batches(data.calibration.batches(ctx.recipe.data.batch_size), ctx.recipe.quantize.calibration,
                                    e.batch.max)
    fp32 = onnxruntime_runner(build / "pruned.onnx", threads)
    ref = RunnerModel(fp32, (e.batch.min, e.batch.max))(data.holdout.images)
    x8 = M.batch_of(data.holdout.images, 8)
    print("\n## NNCF settings, pruned model\n\n| model type | cosine mean to pruned fp32 | cosine min | p50 b=8 ms | "
          "vs ORT fp32 |\n|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mt in ("transformer", "default"):
            xml = Path(tmp) / f"{mt}.xml"
            OV.quantize_nncf(build / "pruned.onnx", xml, batches, model_type=mt)
            r = openvino_runner(xml, threads, "fp32")
            agree = M.agreement(ref, RunnerModel(r, (e.batch.min, e.batch.max))(data.holdout.images))
            st = M.latency({"fp32": fp32, "int8": r}, x8, 5, iterations)
            print(f"| {mt} | {agree['cosine_mean']:.4f} | {agree['cosine_min']:.4f} | {st['int8']['p50']:.2f} | "
                  f"{M.median_ratio(st['fp32']['samples'], st['int8']['samples']):.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--size", type=int, default=None, help="also time every row re-exported at this size (224)")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads of every runner (both runtimes alike)")
    ap.add_argument("--nncf-choices", action="store_true")
    ap.add_argument("--skip-build-size", action="store_true", help="only the --size table")
    ap.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    ap.add_argument("--size-calibration", type=int, default=None, help="INT8 calibration images at --size (default: "
                    "the recipe's; ONNX Runtime's percentile calibration of 256 images at 224x224 needed over 24 GB)")
    a = ap.parse_args()
    BATCHES[:] = a.batches
    ctx = Context.create(load_recipe(a.build / "recipe.yaml"), a.build)
    start = time.time()
    holdout = ctx.data().holdout.images
    side = holdout.shape[-1]
    if not a.skip_build_size:
        rows = rows_of(a.build, a.threads)
        fid = fidelity(rows, ctx, knn=True)
        speed = timed(rows, lambda b: M.batch_of(holdout, b), a.iterations, a.repeats)
        print_rows(f"{a.build.name}: {side}x{side}, {len(holdout)} holdout images, {a.threads} threads, "
                   f"against ONNX Runtime fp32 of the original", fid, speed, knn=True)
    if a.size:
        import torch.nn.functional as F

        with tempfile.TemporaryDirectory() as tmp:
            work = export_at(a.build, ctx, a.size, Path(tmp), a.size_calibration)
            rows = rows_of(work, a.threads)
            big = F.interpolate(holdout[:256].float(), size=(a.size, a.size), mode="bilinear", align_corners=False)
            outs = {n: RunnerModel(o(), (1, 32))(big) for n, (o, _) in rows.items()}
            fid = {n: {"cosine": M.agreement(outs["original onnxruntime fp32"], v)["cosine_mean"],
                       "parity": M.agreement(outs[rows[n][1]], v)["cosine_min"],
                       "parity_mean": M.agreement(outs[rows[n][1]], v)["cosine_mean"]} for n, v in outs.items()}
            speed = timed(rows, lambda b: M.batch_of(big, b), a.iterations, a.repeats)
            print_rows(f"{a.build.name}: re-exported at {a.size}x{a.size} (256 holdout images upsampled), "
                       f"{a.threads} threads, against ONNX Runtime fp32 of the original", fid, speed, knn=False)
    if a.nncf_choices:
        nncf_choices(a.build, ctx, a.iterations, a.threads)
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
