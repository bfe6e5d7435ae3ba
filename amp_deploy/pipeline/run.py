"""Running a build: the stages of the table in order over one folder, each skipped when done.

Each stage reads the previous stages' files and writes its own atomically; manifest.json records
what finished with which inputs, so a stopped build resumes and one stage can be re-run alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from amp_deploy.errors import GateFailed, GateUndecided, StageFailed, UserError, first_line
from amp_deploy.files import remove_stray_temps
from amp_deploy.pipeline.context import Context, Stage
from amp_deploy.pipeline.lock import FolderLock
from amp_deploy.pipeline.manifest import Manifest, input_digests, stage_keys
from amp_deploy.pipeline.preflight import preflight, prepare_out
from amp_deploy.pipeline.stages import STAGES
from amp_deploy.recipe import dump_recipe


def run_stages(ctx: Context, names: Sequence[str], force: bool = False) -> dict[str, str]:
    """Run the named stages in table order, skipping those already done with the same inputs.

    Returns {stage: "ran" | "skipped" | "not recorded"}.
    """
    folder, say = ctx.folder, ctx.reporter
    preflight(ctx.recipe, ctx.device.type)
    plan = memory_plan(ctx, names if force else _pending(ctx, names))
    prepare_out(folder.root)
    with FolderLock(folder.root):
        for p in remove_stray_temps(folder.root):
            say.note(f"removed {p.name}, left by an interrupted build")
        folder.write_recipe(dump_recipe(ctx.recipe))
        manifest = Manifest(folder.manifest)
        digests = input_digests(ctx.recipe, STAGES, manifest.hashes)  # the data folders: stat'ed once a build
        status = {}
        for stage in (s for s in STAGES if s.name in names):
            # keys anew before each stage: a stage that just ran may have written other files
            keys = stage_keys(ctx.recipe, STAGES, manifest.hashes, folder, ctx.device.type, digests)
            if not force and manifest.is_done(stage.name, keys[stage.name], stage.outputs(folder)):
                say.note(f"{stage.name}: inputs unchanged, skipped")
                status[stage.name] = "skipped"
                continue
            _require_previous(ctx, manifest, stage, keys)
            planned = _planned(ctx, stage.name) or plan.get(stage.name)
            status[stage.name] = _run_one(ctx, manifest, stage, keys[stage.name], planned)
        return status


def _pending(ctx: Context, names: Sequence[str]) -> list[str]:
    """The named stages a build would run: all but the leading ones already done with the same inputs
    (read only, before the lock: a stage after one that re-runs may see new inputs, so it counts)."""
    folder = ctx.folder
    if not folder.manifest.is_file():
        return list(names)
    try:
        manifest = Manifest(folder.manifest)
        keys = stage_keys(ctx.recipe, STAGES, dict(manifest.hashes), folder, ctx.device.type)
    except Exception:  # noqa: BLE001 - an unreadable folder: plan everything, the build says what is wrong
        return list(names)
    todo = [s for s in STAGES if s.name in names]
    while todo and manifest.is_done(todo[0].name, keys[todo[0].name], todo[0].outputs(folder)):
        todo.pop(0)
    return [s.name for s in todo]


def memory_plan(ctx: Context, names: Sequence[str]) -> dict[str, dict]:
    """Each stage's planned peak on this build's devices, refused with one line before any work where
    one of the named stages does not fit (nothing is written)."""
    from amp_deploy.pipeline.memory import (
        UNKNOWN_CAPACITY,
        device_capacity,
        planned_peaks,
        process_rss,
        recipe_plan,
        refuse_unfit,
    )

    dev = ctx.device.type
    cap = device_capacity(dev, ctx.nproc)  # --nproc processes on one host share its memory
    ctx.plan_baseline = process_rss()  # before any model is loaded: what a stage in a process of its own starts with
    plans = [p for p in recipe_plan(ctx.recipe, dev, ctx.nproc, capacity=cap, baseline=ctx.plan_baseline)
             if p.stage in names]
    if not cap:
        ctx.reporter.log(f"memory plan: not judged: {UNKNOWN_CAPACITY}")
    refuse_unfit(plans, {dev: cap} if cap else {}, ctx.nproc)
    return planned_peaks(plans)


def _planned(ctx: Context, stage: str) -> dict | None:
    """A stage's plan again, with the searched widths where the search has run (the build's own plan
    took the original's widths, an upper bound)."""
    if stage in ("score", "search") or not ctx.folder.search.is_file():
        return None
    from amp_deploy.pipeline.memory import planned_peaks, recipe_plan
    from amp_deploy.prune.shape import from_record, widths_of

    widths = widths_of(from_record(ctx.folder.read_search()) or []) or None
    plans = planned_peaks(recipe_plan(ctx.recipe, ctx.device.type, ctx.nproc, widths=widths,
                                      baseline=ctx.plan_baseline))
    return plans.get(stage)


def _reset_peak_memory(ctx: Context) -> bool:
    """Start counting this process's peak memory afresh (Linux: clear_refs resets VmHWM; CUDA: the
    allocator's peak); False where the host peak cannot be reset (it then covers the whole process)."""
    if ctx.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_memory(ctx: Context, reset: bool) -> dict[str, float | None]:
    """Peak resident memory of this process (MiB) since `_reset_peak_memory` (DataLoader worker
    processes not included), and the CUDA allocator's peak on a GPU."""
    import resource

    from amp_deploy.pipeline.memory import proc_kib

    rss = proc_kib("/proc/self/status", "VmHWM")
    rss = None if rss is None else rss / 1024
    if rss is None:  # no procfs: the process's peak so far (kB on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    cuda = None
    if ctx.device.type == "cuda":
        import torch

        cuda = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    return {"peak_rss_mib": round(rss, 1), "peak_rss_since": "stage" if reset else "process",
            "peak_cuda_mib": None if cuda is None else round(cuda, 1)}


def _run_one(ctx: Context, manifest: Manifest, stage: Stage, key: str, planned: dict | None = None) -> str:
    start = time.perf_counter()
    reset = _reset_peak_memory(ctx)
    parallel = (stage.parallel(ctx.recipe) if callable(stage.parallel) else stage.parallel) and ctx.nproc > 1
    if parallel:
        from amp_deploy.pipeline.launch import launch_stage

        launch_stage(stage.name, ctx.folder.root, ctx.nproc, ctx.device.type)
        unrecorded = None
    else:
        unrecorded = _guarded(ctx, stage)
    seconds = time.perf_counter() - start
    memory = None if parallel else _peak_memory(ctx, reset)  # torchrun's ranks: not here
    if memory is not None and planned is not None:
        memory["planned_peak_mib"] = round(planned["peak_bytes"] / 2**20, 1)
        memory["planned_terms_mib"] = {k: round(v / 2**20, 1) for k, v in planned["terms"].items()}
    ctx.reporter.clear_tasks()
    if unrecorded:  # finished without a result worth keeping: the next build tries again
        ctx.reporter.log(f"{stage.name}: {unrecorded} (not recorded as done; the next build tries again)")
        return "not recorded"
    manifest.record(stage.name, key, seconds, stage.outputs(ctx.folder), memory)
    peak = f", peak memory {memory['peak_rss_mib'] / 1024:.2f} GiB" if memory else ""
    if memory and memory["peak_cuda_mib"] is not None:
        peak += f" (CUDA {memory['peak_cuda_mib'] / 1024:.2f} GiB)"
    ctx.reporter.log(f"{stage.name}: done in {seconds:.1f}s{peak}")
    return "ran"


def _guarded(ctx: Context, stage: Stage) -> str | None:
    """Run a stage; an unexpected exception becomes one line naming the stage (nothing is recorded,
    and the stage's files are only ever written atomically, so nothing is half-written)."""
    try:
        return stage.run(ctx)
    except (UserError, GateFailed, GateUndecided, KeyboardInterrupt, MemoryError):
        raise
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            where = e.filename or ctx.folder.root
            raise StageFailed(f"stage '{stage.name}': no space left on the device while writing {where}; free some "
                              "space and run the same command again (finished stages are kept)") from e
        raise StageFailed(f"stage '{stage.name}' failed: {type(e).__name__}: {first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - anything else is a defect or an unforeseen input: say where
        raise StageFailed(f"stage '{stage.name}' failed: {type(e).__name__}: {first_line(e)} "
                          "(amp-deploy --debug shows the traceback)") from e


def _require_previous(ctx: Context, manifest: Manifest, stage: Stage, keys: dict[str, str]) -> None:
    i = [s.name for s in STAGES].index(stage.name)
    if i == 0:
        return
    before = STAGES[i - 1]
    # Not verified by hash: a stage run alone works on the files as they are now (so that, say,
    # `validate` judges an ONNX file someone edited), while `build` redoes a stage whose files changed.
    if not manifest.is_done(before.name, keys[before.name], before.outputs(ctx.folder), verify=False):
        if before.name == "compile" and ctx.folder.compile_status.is_file():
            return  # a failed compile is not recorded, but its status is what validate reports
        raise UserError(f"{ctx.folder.root}: stage '{stage.name}' needs '{before.name}' first, finished with this "
                        f"recipe (run `amp-deploy build` or the command for '{before.name}')")
