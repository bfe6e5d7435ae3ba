"""manifest.json: which stages finished, with which inputs, and the hashes of what they wrote.

A stage's key hashes the recipe sections it depends on and the key of the stage before it, so a
changed `validate.iterations` re-runs validation only, and a changed `prune.threshold` re-runs the
search and everything after it but not the scores. Engines and measurements also depend on the
machine they were made on (its GPU, TensorRT's version, the host).
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
from amp_deploy.pipeline.context import Stage
from amp_deploy.files import hash_file_cached, hash_obj, write_json
from amp_deploy.recipe import Recipe

MANIFEST_SCHEMA = "amp-deploy.manifest/1"


def versions() -> dict[str, str]:
    import timm

    return {"amp_deploy": __version__, "torch": torch.__version__, "timm": timm.__version__}


def machine() -> dict[str, Any]:
    """What engines and timings depend on: the GPU, TensorRT's version, the host and its CPUs."""
    import platform

    from amp_deploy.deploy.tensorrt_engine import installed_version

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"tensorrt": installed_version(), "gpu": gpu, "host": platform.node(), "cpus": os.cpu_count()}


def _section(doc: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        doc = doc[k]
    return doc


def stage_keys(recipe: Recipe, stages: Sequence[Stage], hashes: dict | None = None) -> dict[str, str]:
    """The key of every stage; `hashes` caches file hashes by size and mtime (manifest.json's)."""
    doc = recipe.to_dict()
    doc["data"].pop("workers", None)  # how many processes read the images changes no result
    weights = doc["model"]["pretrained"]
    hashes = {} if hashes is None else hashes
    extra = {"weights": hash_file_cached(weights, hashes) if isinstance(weights, str) else weights,
             "versions": versions()}
    keys, prev = {}, hash_obj(extra)
    here = machine()
    for stage in stages:
        bound = stage.machine_bound(recipe) if callable(stage.machine_bound) else stage.machine_bound
        where = {"machine": here} if bound else {}
        prev = keys[stage.name] = hash_obj({"prev": prev, **where, **{d: _section(doc, d) for d in stage.depends}})
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
