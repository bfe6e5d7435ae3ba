"""manifest.json: which stages finished, with which inputs, and the hashes of what they wrote.

A stage's key hashes everything its result depends on:
- the recipe sections it reads (`Stage.depends`, a function of the recipe where a setting matters
  for some recipes only: the search to a latency budget also reads export, quantize, compile and
  validate.threads, the settings its latency table was measured with);
- the contents of the files and folders the recipe names for it (`Stage.reads`: model weights,
  `data.path`, `data.class_names`, `distill.path`; see `path_digest`);
- the content hashes of the files every earlier stage wrote, as they are now: a stage re-run with a
  different result (other images, a re-timed latency search, CUDA scoring) re-runs what follows, and
  one whose files came out the same leaves it be;
- the key of the stage before (so a setting read upstream reaches every later stage);
- the device it ran on (`Stage.device_bound`: scoring, the search and distillation on CUDA differ
  from the CPU's) and, for stages bound to the machine, the machine: its CPU model and count, GPU,
  TensorRT's and the runtimes' versions (not the host name: a container's changes every run).

A changed `validate.iterations` re-runs validation only; a changed `prune.threshold` re-runs the
search and everything after it but not the scores.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from amp_deploy._version import __version__
from amp_deploy.files import hash_file_cached, hash_obj, path_digest, write_json
from amp_deploy.pipeline.context import Stage
from amp_deploy.recipe import Recipe

MANIFEST_SCHEMA = "amp-deploy.manifest/1"


def versions() -> dict[str, str]:
    import timm

    return {"amp_deploy": __version__, "torch": torch.__version__, "timm": timm.__version__}


def machine() -> dict[str, Any]:
    """What engines and timings depend on: the CPU model and count, the GPU, TensorRT's and the
    runtimes' versions."""
    from importlib import metadata

    from amp_deploy.deploy.tensorrt_engine import installed_version
    from amp_deploy.measure.report import cpu_model

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    runtimes = {}
    for dist in ("onnxruntime", "onnxruntime-gpu", "openvino"):
        try:
            runtimes[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"tensorrt": installed_version(), "gpu": gpu, "cpu": cpu_model(), "cpus": os.cpu_count(),
            "runtimes": runtimes}


def _section(doc: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        doc = doc[k]
    return doc


def _resolve(value, recipe: Recipe) -> Any:
    return value(recipe) if callable(value) else value


def input_digests(recipe: Recipe, stages: Sequence[Stage], hashes: dict | None = None) -> dict[str, Any]:
    """The content digest of every file or folder a stage reads by name from the recipe (`Stage.reads`)."""
    doc = recipe.to_dict()
    hashes = {} if hashes is None else hashes
    out: dict[str, Any] = {}
    for stage in stages:
        for dotted in stage.reads:
            value = _section(doc, dotted)
            out[dotted] = path_digest(value, hashes) if isinstance(value, str) else value
    return out


def stage_keys(recipe: Recipe, stages: Sequence[Stage], hashes: dict | None = None, folder=None,
               device: str = "cpu", digests: dict[str, Any] | None = None) -> dict[str, str]:
    """The key of every stage. `hashes` caches file hashes by size and mtime (manifest.json's);
    `folder` (a BuildFolder): the files earlier stages wrote there, as they are now, are part of
    every later key; `digests`: `input_digests` computed once for a build."""
    doc = recipe.to_dict()
    doc["data"].pop("workers", None)  # how many processes read the images changes no result
    hashes = {} if hashes is None else hashes
    digests = input_digests(recipe, stages, hashes) if digests is None else digests
    keys, prev = {}, hash_obj({"versions": versions()})
    here = machine()
    upstream: dict[str, str] = {}
    for stage in stages:
        parts: dict[str, Any] = {"prev": prev, "inputs": dict(upstream),
                                 "reads": {d: digests[d] for d in stage.reads}}
        if _resolve(stage.machine_bound, recipe):
            parts["machine"] = here
        if stage.device_bound:
            parts["device"] = device
        for d in _resolve(stage.depends, recipe):  # a dotted section, or (name, a value computed from the recipe)
            name, value = d if isinstance(d, tuple) else (d, _section(doc, d))
            parts[name] = value
        prev = keys[stage.name] = hash_obj(parts)
        if folder is not None:
            for p in stage.outputs(folder):
                if p.is_file():
                    upstream[p.name] = hash_file_cached(p, hashes)
    return keys


class Manifest:
    """The manifest of one folder, read once per build and rewritten after every stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc = self._read()
        self.hashes: dict = self.doc.setdefault("hashes", {})

    def _read(self) -> dict:
        empty = {"schema": MANIFEST_SCHEMA, "stages": {}}
        if not self.path.is_file():
            return empty
        try:
            doc = json.loads(self.path.read_text())
            return doc if isinstance(doc, dict) and isinstance(doc.get("stages"), dict) else empty
        except ValueError:
            return empty  # unreadable: redo every stage

    @property
    def stages(self) -> dict[str, dict]:
        return self.doc["stages"]

    def is_done(self, stage: str, key: str, outputs: list[Path], verify: bool = True) -> bool:
        """Finished with these inputs, its outputs present (and, with `verify`, unchanged since)."""
        entry = self.stages.get(stage)
        if not entry or entry.get("key") != key:
            return False
        recorded = entry.get("outputs", {})
        return all(p.is_file() and (not verify or hash_file_cached(p, self.hashes) == recorded.get(p.name))
                   for p in outputs) and set(recorded) == {p.name for p in outputs}

    def record(self, stage: str, key: str, seconds: float, outputs: list[Path],
               memory: dict[str, Any] | None = None) -> None:
        self.stages[stage] = {
            "key": key,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 3),
            **(memory or {}),
            "outputs": {p.name: hash_file_cached(p, self.hashes) for p in outputs if p.is_file()},
            "versions": versions(),
        }
        write_json(self.path, self.doc)
