"""TensorRT 10 engines: build from ONNX, check the sidecar, run with torch CUDA tensors.

Written against the documented TensorRT 10 Python API (NVIDIA's samples and Polygraphy's builder):
a strongly typed network parsed from an ONNX file exported in the target dtype, so precision comes
from the graph (LayerNorm kept in fp32 by the exporter, see `export.fp32_norms`); the FP16/BF16
builder flags are used only as the 10.x fallback for a weakly typed fp32 graph (they are
deprecated in 10.12 and gone in 11). TF32 is cleared for fp32 engines, which are references.

`tensorrt` is imported inside the functions: `import amp_deploy` works without it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from amp_deploy.deploy.export import INPUT_NAME, Precision
from amp_deploy.errors import UserError
from amp_deploy.files import atomic_path, hash_file, write_json


@dataclass(frozen=True)
class BuildSettings:
    """Everything an engine build depends on, from the recipe (plain values)."""

    precision: Precision
    batch_min: int
    batch_opt: int
    batch_max: int
    input_shape: tuple[int, int, int]
    workspace_mib: int = 4096
    optimization_level: int = 3
    strongly_typed: bool = True

    def profile(self) -> dict[str, list[int]]:
        c, h, w = self.input_shape
        return {k: [b, c, h, w] for k, b in (("min", self.batch_min), ("opt", self.batch_opt), ("max", self.batch_max))}

    def builder_flags(self, trt_major: int) -> list[str]:
        """Builder flags to set. Strongly typed: none (precision lives in the graph)."""
        if self.strongly_typed or self.precision == "fp32":
            return []
        if trt_major >= 11:
            raise UserError(f"compile.strongly_typed: false needs TensorRT 10 (FP16/BF16 builder flags are gone in "
                            f"{trt_major}); export in {self.precision} and build strongly typed instead")
        return [self.precision.upper()]


def sidecar(settings: BuildSettings, onnx_path: Path, trt_version: str, gpu: str, capability: tuple[int, int],
            seconds: float) -> dict[str, Any]:
    return {"schema": "amp-deploy.plan/1", "tensorrt": trt_version, "gpu": gpu,
            "compute_capability": f"{capability[0]}.{capability[1]}", "onnx": onnx_path.name,
            "onnx_sha256_16": hash_file(onnx_path), "settings": asdict(settings), "profile": settings.profile(),
            "build_seconds": round(seconds, 2)}


def installed_version() -> str | None:
    """TensorRT's version as installed, without importing it (None when it is not installed).

    The README's `tensorrt-cu13` install names its distributions tensorrt_cu13*, not "tensorrt", so
    the version is looked up through whichever distribution provides the `tensorrt` module.
    """
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    for dist in importlib.metadata.packages_distributions().get("tensorrt", []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def sidecar_path(plan_path: str | Path) -> Path:
    """Where a plan's sidecar lives: NAME.plan.json beside NAME.plan."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def read_sidecar(plan_path: str | Path) -> dict[str, Any]:
    """What a plan was built for and from; a UserError when the sidecar is missing or unreadable."""
    path = sidecar_path(plan_path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: the plan's sidecar is missing or unreadable ({e})") from None


def check_sidecar(meta: dict[str, Any], trt_version: str, gpu: str, capability: tuple[int, int]) -> None:
    """An engine runs only on the GPU model and TensorRT version it was built for: say so clearly."""
    want = f"{capability[0]}.{capability[1]}"
    problems = []
    if meta.get("tensorrt") != trt_version:
        problems.append(f"built with TensorRT {meta.get('tensorrt')}, this is {trt_version}")
    if meta.get("compute_capability") != want:
        problems.append(f"built for compute capability {meta.get('compute_capability')} ({meta.get('gpu')}), "
                        f"this GPU is {want} ({gpu})")
    if problems:
        raise UserError("engine does not fit this machine: " + "; ".join(problems) + ". Rebuild it with `amp-deploy compile`")


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: str | Path, plan_path: str | Path, settings: BuildSettings,
                 timing_cache: str | Path | None = None) -> dict[str, Any]:
    """Build and write a serialized engine and its sidecar JSON; return the sidecar."""
    import tensorrt as trt
    import torch

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    start = time.perf_counter()
    logger = _logger()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: external weights beside it load too
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"{onnx_path}: TensorRT could not parse it: " + " | ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    if settings.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # an fp32 engine is a reference: no TF32
    for flag in settings.builder_flags(int(trt.__version__.split(".")[0])):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    p = settings.profile()
    profile.set_shape(INPUT_NAME, p["min"], p["opt"], p["max"])
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT failed to build an engine (see the log above)")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = sidecar(settings, onnx_path, trt.__version__, torch.cuda.get_device_name(),
                   torch.cuda.get_device_capability(), time.perf_counter() - start)
    write_json(sidecar_path(plan_path), meta)
    return meta


class TensorRTRunner:
    """Deserialize a plan, bind torch CUDA tensors, run with execute_async_v3 on a stream."""

    def __init__(self, plan_path: str | Path) -> None:
        import tensorrt as trt
        import torch

        plan_path = Path(plan_path)
        meta = read_sidecar(plan_path)
        check_sidecar(meta, trt.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise UserError(f"{plan_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.meta = meta

    def device_memory_bytes(self) -> int:
        """Activation memory the engine needs (v2 where this TensorRT has it)."""
        return int(getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size)

    def __call__(self, x):
        import torch

        x = x.to("cuda", self.dtypes[self.inputs[0]]).contiguous()
        self.context.set_input_shape(self.inputs[0], tuple(x.shape))
        self.context.set_tensor_address(self.inputs[0], x.data_ptr())
        outs = {}
        for n in self.outputs:
            outs[n] = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device="cuda")
            self.context.set_tensor_address(n, outs[n].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outs[self.outputs[0]]


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[trt_dtype]
