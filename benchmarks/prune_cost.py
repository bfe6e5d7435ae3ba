"""Cost of the width search: cached block inputs vs the reference scheme, in one run.

    .venv/bin/python benchmarks/prune_cost.py [--depth 12] [--images 128] [--json out.json]

A 12-block timm ViT (random init, seeded; 32x32 synthetic images) is searched twice with the same
scores: `cached` replays the hidden states entering the block under search, `naive` runs every
bisection step through the whole model, as the reference code does. Same widths expected.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402

from amp_deploy.data import load_synthetic_data  # noqa: E402
from amp_deploy.prune.families import load_timm  # noqa: E402
from amp_deploy.prune.score import loss_fn, taylor_scores  # noqa: E402
from amp_deploy.prune.search import adaptive_widths  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=2e-5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    base = load_timm("vit_small_patch16_224", False,
                     {"depth": args.depth, "img_size": 32, "patch_size": 4, "embed_dim": 192, "num_heads": 3})
    data = load_synthetic_data(calibration=64, validation=args.images, holdout=1, seed=0, transform=base.transform, size=base.input_size[1:])
    loss = loss_fn("entropy", base.output, 15.0)
    scores = taylor_scores(base, data.calibration.batches(32), loss, cpu)["abs"]
    results = {}
    for mode in ("cached", "naive"):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        res = adaptive_widths(model, scores, data.validation, batch_size=32, loss=loss, threshold=args.threshold,
                              cached=mode == "cached")
        results[mode] = (res, time.perf_counter() - t0)
    (c, tc), (n, tn) = results["cached"], results["naive"]
    assert c.widths == n.widths, (c.widths, n.widths)
    print(f"model: {args.depth} blocks, width 192, 65 tokens; {args.images} validation images; 6 steps per block; threshold {args.threshold:g}")
    print(f"widths (both): {c.widths}\n")
    rows = [["cached", c.block_forwards, f"{tc:.2f}"], ["naive", n.block_forwards, f"{tn:.2f}"],
            ["cached / naive", f"{c.block_forwards / n.block_forwards:.3f}", f"{tc / tn:.3f}"]]
    print_table(["search", "block forwards (per batch)", "wall time s"], rows, "Width search cost, one run")
    write_json(args.json, {"widths": c.widths, "cached": {"block_forwards": c.block_forwards, "seconds": tc},
                           "naive": {"block_forwards": n.block_forwards, "seconds": tn}})


if __name__ == "__main__":
    main()
