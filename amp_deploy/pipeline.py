"""The build: stages over an output folder, each resumable and recorded in manifest.json.

Each stage reads the previous stages' artifacts from the folder and writes its own atomically.
A stage's key hashes the recipe sections it depends on and the key of the stage before it, so a
changed `validate.iterations` re-runs validation only, and a changed `prune.threshold` re-runs the
search and everything after it but not the scores.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from amp_deploy import __version__
from amp_deploy._private import hash_file_cached, hash_obj, remove_stray_temps, write_json, write_text
from amp_deploy.data import Data, load_data
from amp_deploy.errors import UserError
from amp_deploy.families import Loaded, load_model
from amp_deploy.recipe import Recipe, dump_recipe

STAGES = ("score", "search", "rebuild", "export", "compile", "validate")
PRUNE_STAGES = ("score", "search", "rebuild")

MANIFEST_SCHEMA = "amp-deploy.manifest/1"

# Recipe sections (dotted) that each stage depends on, beyond the key of the stage before it.
_DEPENDS: dict[str, tuple[str, ...]] = {
    "score": ("model", "data", "prune.criterion", "prune.temperature"),
    "search": ("prune",),
    "rebuild": (),
    "export": ("export",),
    "compile": ("runtimes", "compile"),
    "validate": ("validate", "runtimes", "compile"),
}

# Files each stage writes: a stage whose outputs are missing or changed is not skipped.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "score": ("scores.safetensors",),
    "search": ("search.json",),
    "rebuild": ("pruned.safetensors",),
    "export": ("original.onnx", "pruned.onnx"),
    "compile": ("compile.json",),
    "validate": ("report.json", "report.md"),
}


def _versions() -> dict[str, str]:
    import timm

    return {"amp_deploy": __version__, "torch": torch.__version__, "timm": timm.__version__}


def _section(doc: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        doc = doc[k]
    return doc


def _machine() -> dict[str, Any]:
    """What engines and timings depend on: the GPU, TensorRT's presence and version, the CPU."""
    import importlib.metadata
    import importlib.util
    import platform

    trt = None
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            trt = importlib.metadata.version("tensorrt")
        except importlib.metadata.PackageNotFoundError:
            trt = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"tensorrt": trt, "gpu": gpu, "host": platform.node(), "cpus": os.cpu_count()}


def stage_keys(recipe: Recipe, hashes: dict | None = None) -> dict[str, str]:
    """The key of every stage; `hashes` caches file hashes by size and mtime (manifest.json's)."""
    doc = recipe.to_dict()
    weights = doc["model"]["pretrained"]
    hashes = {} if hashes is None else hashes
    extra = {"weights": hash_file_cached(weights, hashes) if isinstance(weights, str) else weights,
             "versions": _versions()}
    keys, prev = {}, hash_obj(extra)
    machine = _machine()
    for stage in STAGES:
        # Engines and measurements belong to the machine they were made on; moved to another
        # (a GPU, TensorRT installed), compile and validate run again.
        where = {"machine": machine} if stage in ("compile", "validate") else {}
        prev = keys[stage] = hash_obj({"prev": prev, **where, **{d: _section(doc, d) for d in _DEPENDS[stage]}})
    return keys


@dataclass
class Context:
    """What the stages share in one process: the recipe, the folder and loaded things."""

    recipe: Recipe
    out: Path
    device: torch.device
    log: Callable[[str], None] = print
    progress: Any = None  # a rich.progress.Progress, or None for silence
    nproc: int = 1  # processes for the score stage (torchrun)
    _original: Loaded | None = field(default=None, repr=False)
    _data: Data | None = field(default=None, repr=False)

    def original(self) -> Loaded:
        """A fresh copy of the original model (stages prune their copy in place)."""
        if self._original is None:
            m = self.recipe.model
            sites = m.mlp_sites.model_dump() if m.mlp_sites else None
            # A random-init model (pretrained: false) must be the same model in every stage, every
            # resumed build and every rank: seed its initialisation.
            torch.manual_seed(self.recipe.data.seed)
            self._original = load_model(m.source, m.name, m.pretrained, m.kwargs, sites)
        loaded = copy.deepcopy(self._original)
        loaded.model.to(self.device)
        return loaded

    def data(self) -> Data:
        if self._data is None:
            d = self.recipe.data
            base = self._original or self.original()
            self._data = load_data(d.source, d.path, d.calibration, d.validation, d.holdout, d.seed,
                                   base.transform, base.input_size)
        return self._data

    def task(self, description: str, total: int | None):
        """A progress task; returns an `advance()` callable."""
        if self.progress is None:
            return lambda n=1: None
        tid = self.progress.add_task(description, total=total)
        return lambda n=1: self.progress.advance(tid, n)


# --- manifest ------------------------------------------------------------------------------------


def read_manifest(out: Path) -> dict:
    path = out / "manifest.json"
    if not path.is_file():
        return {"schema": MANIFEST_SCHEMA, "stages": {}}
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc.get("stages"), dict):
            raise ValueError("no stages")
        return doc
    except (ValueError, AttributeError):
        return {"schema": MANIFEST_SCHEMA, "stages": {}}  # unreadable: redo every stage


def is_done(out: Path, manifest: dict, stage: str, key: str, verify: bool = True) -> bool:
    """Finished with these inputs, its outputs present (and, with `verify`, unchanged since)."""
    entry = manifest["stages"].get(stage)
    if not entry or entry.get("key") != key:
        return False
    outputs, hashes = entry.get("outputs", {}), manifest.setdefault("hashes", {})
    return all((out / f).is_file() and (not verify or hash_file_cached(out / f, hashes) == outputs.get(f))
               for f in OUTPUTS[stage])


def record(out: Path, manifest: dict, stage: str, key: str, seconds: float) -> None:
    manifest["stages"][stage] = {
        "key": key,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "outputs": {f: hash_file_cached(out / f, manifest.setdefault("hashes", {}))
                    for f in OUTPUTS[stage] if (out / f).is_file()},
        "versions": _versions(),
    }
    write_json(out / "manifest.json", manifest)


# --- lock ------------------------------------------------------------------------------------------


class FolderLock:
    """One build per output folder. The lock file names its owner (host, pid, process start time);
    a lock whose owner is gone, or whose pid now belongs to another process, is taken over."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"

    def __enter__(self) -> FolderLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise UserError(f"{self.path.parent}: another build (pid {owner['pid']}) is using this "
                                    "folder; wait for it or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}, f)
            return self
        raise UserError(f"{self.path}: could not take the folder lock")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
        except (OSError, ValueError):
            return None  # unreadable or half-written: its writer died

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _start_time(pid: int) -> str | None:
    try:  # field 22 of /proc/PID/stat: start time in clock ticks since boot (Linux)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    if owner.get("host") not in (None, socket.gethostname()):
        return True  # another machine's build on a shared disk: never steal it
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _start_time(pid)
    return start is None or owner.get("start") in (None, start)


# --- running -------------------------------------------------------------------------------------


def prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None


def preflight(recipe: Recipe) -> None:
    """Cheap checks that need more than the recipe schema, run before anything is written."""
    m = recipe.model
    if m.source == "timm":
        import timm

        if not timm.is_model(m.name):
            from amp_deploy.families import unknown_model_error

            raise unknown_model_error(m.name, timm.list_models(), "timm")
    elif m.source == "checkpoint":
        from amp_deploy.rebuild import read_metadata

        read_metadata(m.pretrained)
    if isinstance(m.pretrained, str) and m.pretrained.endswith(".safetensors") and m.source != "checkpoint":
        from amp_deploy.families import safetensors_metadata

        safetensors_metadata(m.pretrained)
    d = recipe.data
    if d.source == "digits":
        from amp_deploy.data import DIGITS_TEST, DIGITS_TOTAL

        if d.holdout > DIGITS_TEST:
            raise UserError(f"data.holdout: the digits test split has {DIGITS_TEST} images, the recipe asks for {d.holdout}")
        if d.calibration + d.validation > DIGITS_TOTAL - DIGITS_TEST:
            raise UserError(f"data: the digits training split has {DIGITS_TOTAL - DIGITS_TEST} images, the recipe asks for "
                            f"{d.calibration + d.validation} (data.calibration + data.validation)")
    if d.source == "folder":
        from amp_deploy.data import image_files

        have, want = len(image_files(Path(d.path))), d.calibration + d.validation + d.holdout
        if have < want:
            raise UserError(f"data.path: {d.path} has {have} image files but the recipe asks for {want} "
                            "(data.calibration + validation + holdout)")


def run_stages(ctx: Context, stages: tuple[str, ...], force: bool = False) -> dict[str, str]:
    """Run `stages` in order, skipping those already done with the same inputs.

    Returns {stage: "ran" | "skipped"}.
    """
    from amp_deploy import stages as impl

    out = ctx.out
    preflight(ctx.recipe)
    prepare_out(out)
    with FolderLock(out):
        for p in remove_stray_temps(out):
            ctx.log(f"[dim]removed {p.name}, left by an interrupted build[/dim]")
        write_text(out / "recipe.yaml", dump_recipe(ctx.recipe))
        manifest = read_manifest(out)
        keys = stage_keys(ctx.recipe, manifest.setdefault("hashes", {}))
        status = {}
        for stage in stages:
            if not force and is_done(out, manifest, stage, keys[stage]):
                ctx.log(f"[dim]{stage}: inputs unchanged, skipped[/dim]")
                status[stage] = "skipped"
                continue
            _require_previous(out, manifest, stage, keys)
            start = time.perf_counter()
            if stage == "score" and ctx.nproc > 1:
                from amp_deploy.distributed import launch_score

                launch_score(out, ctx.nproc, ctx.device.type)
            else:
                getattr(impl, f"stage_{stage}")(ctx)
            seconds = time.perf_counter() - start
            if ctx.progress is not None:  # a finished stage's bars give way to its one-line summary
                for tid in list(ctx.progress.task_ids):
                    ctx.progress.remove_task(tid)
            record(out, manifest, stage, keys[stage], seconds)
            ctx.log(f"{stage}: done in {seconds:.1f}s")
            status[stage] = "ran"
        return status


def _require_previous(out: Path, manifest: dict, stage: str, keys: dict[str, str]) -> None:
    i = STAGES.index(stage)
    if i == 0:
        return
    before = STAGES[i - 1]
    # Not verified by hash: a stage run alone works on the files as they are now (so that, say,
    # `validate` judges an ONNX file someone edited), while `build` redoes a stage whose files changed.
    if not is_done(out, manifest, before, keys[before], verify=False):
        raise UserError(f"{out}: stage '{stage}' needs '{before}' first, finished with this recipe "
                        f"(run `amp-deploy build` or the command for '{before}')")
