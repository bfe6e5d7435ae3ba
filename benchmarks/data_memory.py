"""Peak resident memory of the score and distill stages as their image sets grow (both streamed).

    .venv/bin/python benchmarks/data_memory.py [--sizes 500 4000] [--distill-sizes 80 640] [--folder /tmp/amp_images]

Writes a flat folder of 224x224 JPEG images once (seeded noise), then runs the score stage alone
in a fresh process per size (`amp-deploy` stages over one output folder each) and reads the
process' peak RSS (ru_maxrss). Same model for every size: timm's vit_tiny_patch16_224, random init,
depth 2, 224x224 input. The distill rows run score, search, rebuild and distill (1 epoch) with
`distill.path` a folder of that many 1500x1500 JPEGs (the review's reproduction: 80 of them grew
RSS by 698 MiB when the folder was decoded whole).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

WORKER = """
import resource, sys, time
from amp_deploy.pipeline.context import Context
from amp_deploy.pipeline.run import run_stages
from amp_deploy.recipe import load_recipe
t = time.perf_counter()
run_stages(Context.create(load_recipe(sys.argv[1]), sys.argv[2], "cpu"), sys.argv[3].split(","))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t)
"""


def images(folder: Path, n: int, size: int = 224) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    for i in range(have, n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def _run(recipe: dict, tmp: str, tag: str, stages: str) -> tuple[int, float]:
    path = Path(tmp) / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = subprocess.run([sys.executable, "-c", WORKER, str(path), str(Path(tmp) / f"out{tag}"), stages],
                         capture_output=True, text=True, check=True)
    rss, secs = res.stdout.split()[-2:]
    return int(rss), float(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 4000])
    ap.add_argument("--folder", default="/tmp/amp_images")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--distill-sizes", type=int, nargs="+", default=[80, 640])
    args = ap.parse_args()
    folder = Path(args.folder)
    images(folder, max(args.sizes) + 64 + 64)
    rows, drows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            recipe = _recipe(f"mem{n}", folder, n, args.workers)
            rss, secs = _run(recipe, tmp, str(n), "score")
            rows.append([n, f"{rss / 2**20:.0f}", f"{secs:.0f}"])
        big = Path(args.folder + "_1500")
        images(big, max(args.distill_sizes), 1500)
        for n in args.distill_sizes:
            sub = Path(tmp) / f"distill{n}"
            sub.mkdir()
            for f in sorted(big.glob("*.jpg"))[:n]:
                (sub / f.name).symlink_to(f)
            recipe = _recipe(f"dist{n}", folder, 64, args.workers)
            recipe["distill"] = {"epochs": 1, "path": str(sub), "batch_size": 16}
            recipe["prune"] = {"search": "uniform", "keep_ratio": 0.5}
            rss, secs = _run(recipe, tmp, f"d{n}", "score,search,rebuild,distill")
            drows.append([n, f"{rss / 2**20:.0f}", f"{secs:.0f}"])
    print_table(["data.calibration", "peak RSS MiB", "score seconds"], rows,
                f"score stage, 224x224 JPEG folder, vit_tiny depth 2, batch 32, {args.workers} worker(s)")
    print_table(["distill.path images", "peak RSS MiB", "seconds (score to distill)"], drows,
                f"distill stage, 1500x1500 JPEG folder, 1 epoch, batch 16, {args.workers} worker(s)")


def _recipe(name: str, folder: Path, n: int, workers: int) -> dict:
    return {"name": name, "model": {"source": "timm", "name": "vit_tiny_patch16_224",
                                    "kwargs": {"depth": 2, "num_classes": 10}},
            "data": {"source": "folder", "path": str(folder), "calibration": n, "validation": 64,
                     "holdout": 64, "batch_size": 32, "workers": workers},
            "runtimes": ["onnxruntime"]}


if __name__ == "__main__":
    main()
