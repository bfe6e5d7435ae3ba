"""Stages across processes: `torchrun --nproc_per_node N -m amp_deploy.pipeline.launch OUT DEVICE STAGE`.

Every rank holds the whole model (distillation sharded with `distill.sharding`: 1/N of the student,
its optimizer state and the teacher). Scoring: each rank takes every N-th calibration batch and the
score sums are all-reduced. Search (threshold and parameter budget; a latency budget times on one
process): each rank evaluates every N-th validation batch and the losses are all-reduced, so every
rank settles the same widths. Distillation: each rank takes its share of every global batch and the
gradients are all-reduced (sharded: reduce-scattered). Rank 0 alone writes. `amp-deploy build --nproc N` launches this for the
stages marked parallel in the stage table. NCCL on CUDA (one GPU per rank), gloo on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from amp_deploy.errors import UserError

REFUSED = "amp-deploy rank refused: "  # how a rank reports a UserError to launch_stage


def launch_stage(stage: str, out: Path, nproc: int, device: str) -> None:
    """Run one stage in `nproc` processes with torchrun; raise if any rank fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "amp_deploy.pipeline.launch", str(out), device, stage]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        said = [ln[len(REFUSED):] for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.startswith(REFUSED)]
        if said:  # a rank refused with one line (bad input): that line, not torchrun's banner
            raise UserError(said[0])
        tail = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        raise UserError(f"{stage}: torchrun with {nproc} processes failed (exit {res.returncode}): {tail[0][:300]}")


def main(argv: list[str] | None = None) -> None:
    """One rank of a parallel stage (score, search, distill).

    `OUT DEVICE STAGE`: over an output folder that already holds recipe.yaml (as `amp-deploy build
    --nproc N` launches it; that build records the stage). `OUT DEVICE STAGE --recipe RECIPE
    [KEY=VALUE ...]`: launched by the user's own torchrun, on one node or several; rank 0 prepares the
    folder, holds its lock, and records the finished stage in manifest.json, so that a later
    `amp-deploy build RECIPE --out OUT` on one node skips it.
    """
    import argparse
    import datetime
    import time

    from amp_deploy.pipeline.context import Context
    from amp_deploy.pipeline.stages import STAGES
    from amp_deploy.recipe import load_recipe

    ap = argparse.ArgumentParser(prog="python -m amp_deploy.pipeline.launch")
    ap.add_argument("out")
    ap.add_argument("device", choices=["cpu", "cuda"])
    ap.add_argument("stage", nargs="?", default="score", choices=[s.name for s in STAGES if s.parallel])
    ap.add_argument("--recipe", help="the recipe (then rank 0 prepares the folder and records the stage)")
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE recipe overrides, with --recipe")
    args = ap.parse_intermixed_args(argv)
    stage = next(s for s in STAGES if s.name == args.stage)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    # A latency-budget search times on rank 0 alone while the other ranks wait in a broadcast: a table
    # of TensorRT engines for a giant tower takes far longer than the default 10 (NCCL) or 30 minutes.
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=8))
    try:
        recipe = load_recipe(args.recipe or Path(args.out) / "recipe.yaml", args.overrides)
        ctx = Context.create(recipe, args.out, dev)
        with _folder(ctx, standalone=args.recipe is not None) as record:
            start = time.perf_counter()
            try:
                stage.run(ctx)
            except UserError as err:  # one line the launching build repeats (torchrun prints only its banner)
                print(f"{REFUSED}{err}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            dist.barrier()  # every rank finished its share before rank 0 records it
            record(stage, time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def _folder(ctx, standalone: bool):
    """Rank 0 of a standalone launch: preflight, the folder, its lock, and recording the stage."""
    import contextlib

    from amp_deploy.pipeline.lock import FolderLock
    from amp_deploy.pipeline.manifest import Manifest, stage_keys
    from amp_deploy.pipeline.preflight import preflight, prepare_out
    from amp_deploy.pipeline.stages import STAGES
    from amp_deploy.recipe import dump_recipe

    if not standalone or dist.get_rank() != 0:
        return contextlib.nullcontext(lambda stage, seconds: None)

    @contextlib.contextmanager
    def held():
        preflight(ctx.recipe, ctx.device.type)
        prepare_out(ctx.folder.root)
        with FolderLock(ctx.folder.root):
            ctx.folder.write_recipe(dump_recipe(ctx.recipe))
            manifest = Manifest(ctx.folder.manifest)
            keys = stage_keys(ctx.recipe, STAGES, manifest.hashes, ctx.folder, ctx.device.type)
            yield lambda stage, seconds: manifest.record(stage.name, keys[stage.name], seconds, stage.outputs(ctx.folder))

    return held()


if __name__ == "__main__":
    main()
