"""Peak resident memory of the score stage as data.calibration grows (streamed calibration images).

    .venv/bin/python benchmarks/data_memory.py [--sizes 500 4000] [--folder /tmp/amp_images]

Writes a flat folder of 224x224 JPEG images once (seeded noise), then runs the score stage alone
in a fresh process per size (`amp-deploy` stages over one output folder each) and reads the
process' peak RSS (ru_maxrss). Same model for every size: timm's vit_tiny_patch16_224, random init,
depth 2, 224x224 input.
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
from amp_deploy.build.context import Context
from amp_deploy.build.run import run_stages
from amp_deploy.recipe import load_recipe
t = time.perf_counter()
run_stages(Context.create(load_recipe(sys.argv[1]), sys.argv[2], "cpu"), ["score"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t)
"""


def images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    for i in range(have, n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 4000])
    ap.add_argument("--folder", default="/tmp/amp_images")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    folder = Path(args.folder)
    images(folder, max(args.sizes) + 64 + 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            recipe = {"name": f"mem{n}", "model": {"source": "timm", "name": "vit_tiny_patch16_224",
                                                  "kwargs": {"depth": 2, "num_classes": 10}},
                      "data": {"source": "folder", "path": str(folder), "calibration": n, "validation": 64,
                               "holdout": 64, "batch_size": 32, "workers": args.workers},
                      "runtimes": ["onnxruntime"]}
            path = Path(tmp) / f"{n}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            res = subprocess.run([sys.executable, "-c", WORKER, str(path), str(Path(tmp) / f"out{n}")],
                                 capture_output=True, text=True, check=True)
            rss, secs = res.stdout.split()[-2:]
            rows.append([n, f"{int(rss) / 2**20:.0f}", f"{float(secs):.0f}"])
    print_table(["data.calibration", "peak RSS MiB", "score seconds"], rows,
                f"score stage, 224x224 JPEG folder, vit_tiny depth 2, batch 32, {args.workers} worker(s)")


if __name__ == "__main__":
    main()
