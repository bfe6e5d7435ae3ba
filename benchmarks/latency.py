"""Realised speedup vs FLOP speedup of ragged MLP widths, aligned and unaligned, per runtime.

    .venv/bin/python benchmarks/latency.py [--models vit_small_patch16_224 vit_base_patch16_224]
        [--batches 1 8] [--iterations 20] [--runtimes onnxruntime torch] [--json out.json]

Random weights (speed does not depend on them). One fixed AMP-like width profile per model: the
`aligned` variant rounds every width to a multiple of 64, the `unaligned` one takes one neuron
less (odd widths, about the same FLOPs). Original, aligned and unaligned are timed interleaved in
one run, per runtime and batch size. Figures are CPU figures unless the runtime says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402

from amp_deploy.deploy.export import export_onnx  # noqa: E402
from amp_deploy.deploy.runtimes import onnxruntime_runner, torch_runner  # noqa: E402
from amp_deploy.measure.metrics import count_flops, latency  # noqa: E402
from amp_deploy.measure.report import cpu_model  # noqa: E402
from amp_deploy.prune.families import load_timm  # noqa: E402
from amp_deploy.prune.rebuild import apply_widths  # noqa: E402

PROFILE = [0.75, 0.6, 0.5, 0.45, 0.4, 0.4, 0.35, 0.35, 0.3, 0.3, 0.35, 0.5]  # kept fraction per block


def variants(name: str) -> dict:
    torch.manual_seed(0)
    base = load_timm(name, False, {})
    h = base.widths()[0]
    aligned = [max(64, round(f * h / 64) * 64) for f in PROFILE[: len(base.widths())]]
    out = {"original": base}
    for label, widths in (("aligned", aligned), ("unaligned", [w - 1 for w in aligned])):
        m = copy.deepcopy(base)
        apply_widths(m, None, widths)
        out[label] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}\n", flush=True)
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            models = variants(name)
            size = models["original"].input_size
            flops = {k: count_flops(m.model, size) for k, m in models.items()}
            widths = {k: m.widths() for k, m in models.items()}
            print(f"{name}: aligned widths {widths['aligned']}", flush=True)
            for rt in args.runtimes:
                if rt == "onnxruntime":
                    runners = {k: onnxruntime_runner(export_onnx(
                        m.model, Path(tmp) / f"{name}_{k}.onnx", size, opset=18, batch_min=1,
                        batch_opt=max(args.batches), batch_max=max(args.batches)))
                               for k, m in models.items()}
                else:
                    runners = {k: torch_runner(m.model) for k, m in models.items()}
                for b in args.batches:
                    x = torch.randn(b, *size).numpy()
                    st = latency(runners, x, args.warmup, args.iterations)
                    for k in ("aligned", "unaligned"):
                        realised = st["original"]["p50"] / st[k]["p50"]
                        flop_speedup = flops["original"] / flops[k]
                        rows.append([name, rt, b, k, f"{st['original']['p50']:.2f}", f"{st[k]['p50']:.2f}",
                                     f"{realised:.2f}x", f"{flop_speedup:.2f}x", f"{realised / flop_speedup:.2f}",
                                     f"{st[k]['cv']:.1%}"])
                        records.append({"model": name, "runtime": rt, "batch": b, "variant": k, "widths": widths[k],
                                        "p50_original_ms": st["original"]["p50"], "p50_ms": st[k]["p50"],
                                        "realised_speedup": realised, "flop_speedup": flop_speedup})
                    print(f"  {rt} batch {b} done", flush=True)
    print()
    print_table(["model", "runtime", "batch", "variant", "original p50 ms", "pruned p50 ms", "realised speedup",
                 "FLOP speedup", "realised / FLOP", "CV"], rows, "Realised vs FLOP speedup")
    write_json(args.json, {"cpu": cpu_model(), "threads": torch.get_num_threads(), "profile": PROFILE, "rows": records})


if __name__ == "__main__":
    main()
