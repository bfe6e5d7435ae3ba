"""The memory plan against the measured peaks, stage by stage, on the CPU (issue 29, item 2).

Builds each model size on synthetic images, each stage (score, search, distill, export, validate) in a
process of its own, as the plan plans it; then reads manifest.json: each stage's measured peak (resident
memory of its process) beside its planned peak.

    python benchmarks/memory_plan.py --out out/memory_plan [--sizes small base]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

SIZES = {  # timm factories at 224x224, depth cut to keep a 2-core build short
    "tiny": ("vit_tiny_patch16_224", {"depth": 6}),
    "small": ("vit_small_patch16_224", {"depth": 8}),
    "base": ("vit_base_patch16_224", {"depth": 8}),
}
STAGES = ("score", "search", "distill", "export", "validate")
ALL_STAGES = ("score", "search", "rebuild", "distill", "export", "quantize", "compile", "validate")
ONE_STAGE = """
import sys
from amp_deploy.errors import GateFailed
from amp_deploy.pipeline.context import Context
from amp_deploy.pipeline.run import run_stages
from amp_deploy.recipe import load_recipe
ctx = Context.create(load_recipe(sys.argv[1]), sys.argv[2], "cpu")
try:
    run_stages(ctx, [sys.argv[3]])
except GateFailed:
    pass  # a random-init model's fidelity gate: not what is measured here
"""


def recipe(name: str, kwargs: dict, images: int) -> dict:
    return {
        "name": f"plan-{name}",
        "model": {"source": "timm", "name": name, "pretrained": False, "kwargs": {**kwargs, "num_classes": 0}},
        "data": {"source": "synthetic", "calibration": images, "validation": images, "holdout": images,
                 "batch_size": 16, "workers": 0},
        "prune": {"threshold": 0.05, "steps": 2},
        "distill": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "warmup": 0.0},
        "export": {"batch": {"min": 1, "opt": 8, "max": 16}},
        "runtimes": ["onnxruntime"],
        "validate": {"batch_sizes": [1, 16], "warmup": 1, "iterations": 2},
    }


def run(size: str, out: Path, images: int, checkpointing: bool) -> list[list]:
    name, kwargs = SIZES[size]
    folder = out / f"{size}{'-ckpt' if checkpointing else ''}"
    doc = recipe(name, kwargs, images)
    doc["distill"]["checkpointing"] = checkpointing
    doc["prune"]["checkpointing"] = checkpointing
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    for stage in ALL_STAGES:  # each stage in a process of its own, as the plan plans it
        res = subprocess.run([sys.executable, "-c", ONE_STAGE, str(path), str(folder), stage],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{size}: stage {stage} failed: {res.stderr[-2000:]}")
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = []
    for stage in STAGES:
        rec = manifest["stages"].get(stage, {})
        if "planned_peak_mib" not in rec:
            continue
        measured, planned = rec["peak_rss_mib"], rec["planned_peak_mib"]
        terms = ", ".join(f"{k} {v:.0f}" for k, v in rec["planned_terms_mib"].items())
        rows.append([f"{name} depth {kwargs['depth']}", "yes" if checkpointing else "no", stage, f"{measured:.0f}",
                     f"{planned:.0f}", f"{planned / measured:.2f}", terms])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/memory_plan")
    ap.add_argument("--sizes", nargs="+", default=["small", "base"], choices=list(SIZES))
    ap.add_argument("--images", type=int, default=64, help="calibration, validation and holdout images each")
    ap.add_argument("--checkpointing", action="store_true", help="score and distil with activation checkpointing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        rows += run(size, Path(args.out), args.images, args.checkpointing)
    print_table(["model", "checkpointing", "stage", "measured MiB", "planned MiB", "planned / measured",
                 "planned terms (MiB)"], rows, "memory plan vs measured peak, CPU")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
