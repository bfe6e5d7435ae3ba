"""A Triton Inference Server model repository entry for an ONNX model or a TensorRT plan.

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx                    backend onnxruntime
    REPO/NAME/1/model_<cc>.plan               platform tensorrt_plan, one file per compute capability
    REPO/NAME/1/model.xml, model.bin          backend openvino (OpenVINO IR: fp32, or NNCF's INT8)

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

from amp_deploy.deploy.export import INPUT_NAME, OUTPUT_NAME
from amp_deploy.errors import UserError
from amp_deploy.files import SAFE_NAME

_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16"}


def _io(onnx_path: Path) -> tuple[list[int], list[int], str]:
    """Input dims and output dims without the batch axis, and the element type, from the ONNX graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def dims(value) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim][1:]

    dtype = _ONNX_TYPES.get(graph.input[0].type.tensor_type.elem_type, "TYPE_FP32")
    return dims(graph.input[0]), dims(graph.output[0]), dtype


def config_text(name: str, platform: Literal["onnxruntime", "tensorrt", "openvino"], input_dims: list[int],
                output_dims: list[int], dtype: str, max_batch: int, plans: dict[str, str] | None = None,
                parameters: dict[str, str] | None = None) -> str:
    """Triton's config.pbtxt for one model (dynamic batching, one instance)."""
    kind = {"tensorrt": "KIND_GPU", "openvino": "KIND_CPU"}.get(platform, "KIND_AUTO")
    lines = [f'name: "{name}"',
             'platform: "tensorrt_plan"' if platform == "tensorrt" else f'backend: "{platform}"',
             f"max_batch_size: {max_batch}",
             f'input [ {{ name: "{INPUT_NAME}" data_type: {dtype} dims: {input_dims} }} ]',
             f'output [ {{ name: "{OUTPUT_NAME}" data_type: {dtype} dims: {output_dims} }} ]',
             "dynamic_batching { }",
             f"instance_group [ {{ kind: {kind} count: 1 }} ]"]
    if plans:
        entries = ", ".join(f'{{ key: "{cc}" value: "{f}" }}' for cc, f in sorted(plans.items()))
        lines.append(f"cc_model_filenames [ {entries} ]")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write_model_repository(repo: Path, name: str, *, onnx_path: Path, max_batch: int, plan_path: Path | None = None,
                           ir_path: Path | None = None, provenance: dict | None = None) -> Path:
    """Write REPO/NAME serving `onnx_path` (backend onnxruntime) or, given `plan_path`, that TensorRT
    plan (platform tensorrt_plan, keyed by the compute capability in its sidecar). The entry appears
    whole or not at all; `provenance` is written beside config.pbtxt as amp-deploy.json."""
    from amp_deploy.deploy.export import external_files
    from amp_deploy.deploy.openvino import ir_files
    from amp_deploy.deploy.tensorrt_engine import read_sidecar

    if not re.fullmatch(SAFE_NAME, name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    plans, platform, parameters = None, "onnxruntime" if plan_path is None else "tensorrt", None
    if ir_path is not None:  # OpenVINO IR; the ONNX export it came from names the shapes
        in_dims, out_dims, dtype = _io(onnx_path)
        files = dict(zip(("model.xml", "model.bin"), ir_files(ir_path)))
        platform, parameters = "openvino", {"PERFORMANCE_HINT": "LATENCY"}
    elif plan_path is None:
        in_dims, out_dims, dtype = _io(onnx_path)
        files = {"model.onnx": onnx_path, **{f.name: f for f in external_files(onnx_path)}}
    else:
        meta = read_sidecar(plan_path)
        cc = meta["compute_capability"]
        src = plan_path.parent / meta["onnx"]  # the half-precision ONNX the plan was built from, if kept
        in_dims, out_dims, dtype = _io(src if src.is_file() else onnx_path)
        plans = {cc: f"model_{cc}.plan"}
        files = {plans[cc]: plan_path}
    text = config_text(name, platform, in_dims, out_dims, dtype, max_batch, plans, parameters)
    return _write_entry(Path(repo), name, files, text, provenance or {})


def _write_entry(repo: Path, name: str, files: dict[str, Path], config: str, provenance: dict) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmpdir", dir=repo))
    try:
        (work / "1").mkdir()
        for fname, src in files.items():
            shutil.copy2(src, work / "1" / fname)
        (work / "config.pbtxt").write_text(config)
        (work / "amp-deploy.json").write_text(json.dumps(provenance, indent=2))
        target = repo / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return repo / name
