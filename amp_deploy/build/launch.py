"""Stages across processes: `torchrun --nproc_per_node N -m amp_deploy.build.launch OUT DEVICE STAGE`.

Every rank holds the whole model. Scoring: each rank takes every N-th calibration batch and the
score sums are all-reduced. Distillation: each rank takes its share of every global batch and the
gradients are all-reduced. Rank 0 alone writes. `amp-deploy build --nproc N` launches this for the
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


def launch_stage(stage: str, out: Path, nproc: int, device: str) -> None:
    """Run one stage in `nproc` processes with torchrun; raise if any rank fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "amp_deploy.build.launch", str(out), device, stage]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        raise UserError(f"{stage}: torchrun with {nproc} processes failed (exit {res.returncode}): {tail[0][:300]}")


def main(argv: list[str] | None = None) -> None:
    """One rank of a stage over the output folder `OUT` (its saved recipe.yaml)."""
    from amp_deploy.build.context import Context
    from amp_deploy.build.stages import STAGES
    from amp_deploy.recipe import load_recipe

    out, device, name = ([*(argv or sys.argv[1:]), "score"])[:3]
    stage = next(s for s in STAGES if s.name == name and s.parallel)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        recipe = load_recipe(Path(out) / "recipe.yaml")
        stage.run(Context.create(recipe, out, dev))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
