"""A Triton Inference Server model repository entry for a build's pruned (or original) model.

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx                    backend onnxruntime
    REPO/NAME/1/model_<cc>.plan               platform tensorrt_plan, one file per compute capability

A TensorRT engine only runs on the GPU model it was built for, so plans are listed under
`cc_model_filenames` keyed by the compute capability recorded in their sidecar.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from amp_deploy.errors import UserError
from amp_deploy.export import INPUT_NAME, OUTPUT_NAME
from amp_deploy.recipe import NAME_PATTERN

_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16"}


def _io(onnx_path: Path) -> tuple[list[int], list[int], str]:
    """Input dims and output dims without the batch axis, and the element type, from the ONNX graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def dims(value) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim][1:]

    dtype = _ONNX_TYPES.get(graph.input[0].type.tensor_type.elem_type, "TYPE_FP32")
    return dims(graph.input[0]), dims(graph.output[0]), dtype


def config_text(name: str, platform: Literal["onnxruntime", "tensorrt"], input_dims: list[int],
                output_dims: list[int], dtype: str, max_batch: int, plans: dict[str, str] | None = None) -> str:
    kind = "KIND_GPU" if platform == "tensorrt" else "KIND_AUTO"
    lines = [f'name: "{name}"',
             'platform: "tensorrt_plan"' if platform == "tensorrt" else 'backend: "onnxruntime"',
             f"max_batch_size: {max_batch}",
             f'input [ {{ name: "{INPUT_NAME}" data_type: {dtype} dims: {input_dims} }} ]',
             f'output [ {{ name: "{OUTPUT_NAME}" data_type: {dtype} dims: {output_dims} }} ]',
             "dynamic_batching { }",
             f"instance_group [ {{ kind: {kind} count: 1 }} ]"]
    if plans:
        entries = ", ".join(f'{{ key: "{cc}" value: "{f}" }}' for cc, f in sorted(plans.items()))
        lines.append(f"cc_model_filenames [ {entries} ]")
    return "\n".join(lines) + "\n"


def write_model_repository(out: Path, repo: Path, name: str | None = None,
                           backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime",
                           which: Literal["pruned", "original"] = "pruned") -> Path:
    """Write REPO/NAME from the build in `out` (NAME: the recipe's name by default); the entry
    appears whole or not at all."""
    out, repo = Path(out), Path(repo)
    recipe = _saved_recipe(out)
    if name is None:
        name = recipe.get("name") or out.name
    if not re.fullmatch(NAME_PATTERN, name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    onnx_path = out / f"{which}.onnx"
    if not onnx_path.is_file():
        raise UserError(f"{out}: no {which}.onnx; run `amp-deploy build` (or `export`) first")
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    max_batch = int(((recipe.get("export") or {}).get("batch") or {}).get("max", 8))
    files: dict[str, Path] = {}
    plans = None
    if backend == "onnxruntime":
        in_dims, out_dims, dtype = _io(onnx_path)
        from amp_deploy.export import external_files

        files = {"model.onnx": onnx_path, **{f.name: f for f in external_files(onnx_path)}}
    else:
        plan = out / f"{which}.plan"
        if not plan.is_file():
            raise UserError(f"{out}: no {which}.plan; build engines with `amp-deploy compile` on a GPU with TensorRT")
        meta = json.loads(plan.with_name(plan.name + ".json").read_text())
        cc = meta["compute_capability"]
        src = out / meta["onnx"]
        in_dims, out_dims, dtype = _io(src if src.is_file() else onnx_path)
        plans = {cc: f"model_{cc}.plan"}
        files = {plans[cc]: plan}
    text = config_text(name, backend, in_dims, out_dims, dtype, max_batch, plans)
    repo.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmpdir", dir=repo))
    try:
        (work / "1").mkdir()
        for fname, src in files.items():
            shutil.copy2(src, work / "1" / fname)
        (work / "config.pbtxt").write_text(text)
        (work / "amp-deploy.json").write_text(json.dumps({"source": str(out), "model": which, "backend": backend,
                                                          "stages": list(manifest.get("stages", {}))}, indent=2))
        target = repo / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return repo / name


def _saved_recipe(out: Path) -> dict:
    """The recipe a build saved into its folder, as a plain document ({} when there is none)."""
    import yaml

    path = out / "recipe.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
