"""Does a latency budget's end-to-end check time what ships? (issue 28, 2026-12-07)

    python benchmarks/budget_check_gap.py --build out/heads_int8b/joint-2.5 [--rounds 60] [--repeats 3]

For a finished build with `prune.target_speedup`: the chosen shapes are prepared again exactly as the
search's check prepares them (`pipeline.speedup.runner_factory`: exported, and for INT8 quantized with
minmax on 16 images), and timed against the ORIGINAL in fp32 (`original.onnx`) beside the file the build
shipped for the budget's row, two runners at a time, interleaved, `--repeats` times in turn; the speedup
is the median of per-round ratios. Two files that run alike say a gap between the build's check and a
later loop is the machine's, not the check's. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_deploy.deploy.runtimes import onnxruntime_runner  # noqa: E402
from amp_deploy.measure import metrics as M  # noqa: E402
from amp_deploy.pipeline import speedup as S  # noqa: E402
from amp_deploy.pipeline.context import Context  # noqa: E402
from amp_deploy.prune.shape import recorded_shapes  # noqa: E402
from amp_deploy.recipe import load_recipe  # noqa: E402
from benchmarks._common import print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    recipe = load_recipe(str(a.build / "recipe.yaml"), [])
    lat = recipe.prune.latency
    if lat.runtime != "onnxruntime":
        sys.exit(f"{a.build}: the budget runs on {lat.runtime}; this check times ONNX Runtime builds")
    ctx = Context.create(recipe, a.build)
    shapes = recorded_shapes(json.loads((a.build / "search.json").read_text()))[0]
    scores = ctx.folder.read_scores(recipe.prune.taylor)
    heads = ctx.folder.read_head_scores(recipe.prune.taylor) if any(s.heads for s in shapes) else None
    shipped = a.build / ("pruned.onnxruntime-int8.onnx" if lat.precision == "int8" else "pruned.onnx")
    x = S.timing_input(ctx, lat.batch)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        make = S.runner_factory(ctx, ctx.original().input_size, Path(work))
        runners = {"as the check prepares it": make(lambda: S._pruned(ctx, shapes, scores, heads), "check")(),
                   f"shipped ({shipped.name})": onnxruntime_runner(shipped, recipe.validate_.threads)}
        fp32 = onnxruntime_runner(a.build / "original.onnx", recipe.validate_.threads)
        for rep in range(a.repeats):
            for name, runner in runners.items():
                st = M.latency({"full": fp32, "pruned": runner}, x, lat.warmup, a.rounds)
                rows.append([str(rep + 1), name, f"{1 / M.median_ratio(st['pruned']['samples'], st['full']['samples']):.3f}x",
                             f"{st['full']['p50']:.2f}", f"{st['pruned']['p50']:.2f}"])
    print_table(["repeat", "pruned model", f"speedup over fp32 original, b={lat.batch}", "original p50 ms",
                 "pruned p50 ms"], rows, f"{a.build}: the budget's check against the shipped file "
                 f"({lat.runtime} {lat.precision})")


if __name__ == "__main__":
    main()
