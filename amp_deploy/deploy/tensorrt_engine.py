"""TensorRT engines (10.x and 11.x): build from ONNX, check the sidecar, run with torch CUDA tensors.

A strongly typed network parsed from an ONNX file exported in the target dtype, so precision comes
from the graph (LayerNorm kept in fp32 by the exporter); TF32 is cleared for fp32 engines, which
are references. `tensorrt` is imported inside the functions: `import amp_deploy` works without it.

TensorRT 10.x and 11.x, from NVIDIA's 10.x -> 11.x migration guide:
- 11.x removed weak typing: every network is strongly typed, the STRONGLY_TYPED creation flag is
  accepted and ignored, and the precision builder flags (FP16, BF16, INT8, ...) are gone. We set the
  flag on both (required on 10.x for dtypes from the graph); `compile.strongly_typed: false` (an fp32
  graph plus the FP16/BF16 flag) is the 10.x-only path and is refused on 11.x with a clear error.
- 11.x removed `ICudaEngine.device_memory_size`; `device_memory_size_v2` (10.x too) replaces it.
- Implicit batch and EXPLICIT_BATCH are gone since 10.0; we never use them.
Names used only on 10.x are listed in `TRT10_ONLY`; the test suite checks every TensorRT attribute
this module uses against the 11.x bindings' symbol list and type-checks it against 10.13's stubs.

Compared call by call with Polygraphy's TensorRT backend (`backend/trt/loader.py`, `config.py`,
`runner.py` in NVIDIA/TensorRT's tools/Polygraphy):
- Logger: one module-level logger, as Polygraphy's global one; ours is plain trt.Logger(WARNING).
- create_network: same flag handling and the same None check (Polygraphy: G_LOGGER.critical).
- Parser: parse_from_file, as Polygraphy, so external weights beside the ONNX file load; parser
  errors are collected into one message.
- Config: workspace pool limit, builder optimization level and one optimization profile from the
  recipe's export.batch (Polygraphy fills a default profile from the network instead). TF32:
  Polygraphy clears it unless asked; we clear it for fp32 engines and leave it for fp16/bf16 ones,
  whose fp32 islands (LayerNorm) may use it.
- Timing cache: Polygraphy loads the file (falling back to an empty cache), calls
  set_timing_cache(ignore_mismatch=False) without checking its bool, and after the build combines
  the file's cache into the config's with ignore_mismatch=True under a file lock. We key the cache
  file by TensorRT version and compute capability, so a cache from another GPU or version is never
  loaded; a cache TensorRT refuses is replaced by an empty one with a warning rather than silently
  ignored; get_timing_cache() returning None skips the save. No combine step: one build holds the
  folder lock, and the config's cache was created from the file, so it already holds its entries.
- build_serialized_network: None check as Polygraphy. We then write the plan and its sidecar only
  after every fallible step, and the sidecar records the plan's hash, so a plan and a sidecar that
  disagree (a crash between the two renames) are refused at load time.
- Runner: Polygraphy sets an input shape only when it changed and checks set_input_shape,
  set_tensor_address and execute_async_v3, as we do; it uses an output allocator where we allocate
  outputs from get_tensor_shape after the input shape is set (one static-rank output here). We also
  refuse a batch outside the engine's profile with a clear error before TensorRT sees it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from amp_deploy.deploy.export import INPUT_NAME, Precision
from amp_deploy.errors import UserError
from amp_deploy.files import atomic_path, hash_bytes, hash_file

if TYPE_CHECKING:  # for annotations only: at run time tensorrt is imported where it is used
    import tensorrt as trt

# TensorRT names this module uses only on 10.x (removed in 11.x); everything else exists in both. The
# FP16/BF16 builder flags are reached by name (`builder_flags`), only on 10.x.
TRT10_ONLY = frozenset({"device_memory_size"})

T = TypeVar("T")
_LOGGER: trt.Logger | None = None


def logger() -> trt.Logger:
    """The one TensorRT logger of this process (warnings and errors)."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def major_version(version: str) -> int:
    return int(version.split(".")[0])


@dataclass(frozen=True)
class BuildSettings:
    """Everything an engine build depends on, from the recipe (plain values)."""

    precision: Precision | str  # fp32 | fp16 | bf16, or int8 | fp8 for a Q/DQ graph (strongly typed)
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


def timing_cache_path(folder: str | Path, trt_version: str, capability: tuple[int, int]) -> Path:
    """Where the timing cache of this TensorRT version on this GPU generation lives."""
    return Path(folder) / f"timing-trt{trt_version}-sm{capability[0]}{capability[1]}.cache"


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


def sidecar(settings: BuildSettings, onnx_path: Path, plan: bytes, trt_version: str, gpu: str,
            capability: tuple[int, int], seconds: float) -> dict[str, Any]:
    return {"schema": "amp-deploy.plan/1", "tensorrt": trt_version, "gpu": gpu,
            "compute_capability": f"{capability[0]}.{capability[1]}", "onnx": onnx_path.name,
            "onnx_sha256_16": hash_file(onnx_path), "plan_sha256_16": hash_bytes(plan),
            "settings": asdict(settings), "profile": settings.profile(), "build_seconds": round(seconds, 2)}


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


def _need(obj: T | None, what: str) -> T:
    """TensorRT returns None where it failed (and logged why): turn that into a clear error."""
    if obj is None:
        raise UserError(f"TensorRT could not create {what} (see the TensorRT log above)")
    return obj


def _network(builder: trt.Builder, settings: BuildSettings, onnx_path: Path
             ) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    import tensorrt as trt

    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = _need(builder.create_network(flags), "a network")
    parser = _need(trt.OnnxParser(network, logger()), "an ONNX parser")
    if not parser.parse_from_file(str(onnx_path)):  # by path: external weights beside it load too
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"{onnx_path}: TensorRT could not parse it: " + " | ".join(errors))
    return network, parser


def _config(builder: trt.Builder, settings: BuildSettings, cache_blob: bytes) -> trt.IBuilderConfig:
    import tensorrt as trt

    config = _need(builder.create_builder_config(), "a builder config")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    if settings.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # an fp32 engine is a reference: no TF32
    for flag in settings.builder_flags(major_version(trt.__version__)):
        config.set_flag(getattr(trt.BuilderFlag, flag))  # 10.x only: see TRT10_ONLY
    profile = _need(builder.create_optimization_profile(), "an optimization profile")
    p = settings.profile()
    profile.set_shape(INPUT_NAME, trt.Dims(p["min"]), trt.Dims(p["opt"]), trt.Dims(p["max"]))
    if config.add_optimization_profile(profile) < 0:
        raise UserError(f"TensorRT refused the optimization profile {p}")
    cache = _need(config.create_timing_cache(cache_blob), "a timing cache")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        import warnings

        warnings.warn("TensorRT refused the saved timing cache; building with an empty one", stacklevel=2)
        config.set_timing_cache(_need(config.create_timing_cache(b""), "a timing cache"), ignore_mismatch=False)
    return config


def build_engine(onnx_path: str | Path, plan_path: str | Path, settings: BuildSettings,
                 cache_folder: str | Path | None = None) -> dict[str, Any]:
    """Build a serialized engine; write it, its sidecar JSON and the timing cache; return the sidecar.

    Nothing is written until the build and every step that can fail have succeeded.
    """
    import tensorrt as trt
    import torch

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    start = time.perf_counter()
    capability = torch.cuda.get_device_capability()
    cache_path = timing_cache_path(cache_folder, trt.__version__, capability) if cache_folder else None
    builder = _need(trt.Builder(logger()), "a builder")
    network, _parser = _network(builder, settings, onnx_path)  # the parser owns weights the network uses
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config = _config(builder, settings, blob)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    plan = bytes(serialized)
    built_cache = config.get_timing_cache()  # None when the build kept none
    cache_bytes = bytes(built_cache.serialize()) if built_cache is not None else None
    meta = sidecar(settings, onnx_path, plan, trt.__version__, torch.cuda.get_device_name(), capability,
                   time.perf_counter() - start)
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(plan)
    with atomic_path(sidecar_path(plan_path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    if cache_path is not None and cache_bytes:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(cache_bytes)
    return meta


def device_memory_bytes(engine: trt.ICudaEngine) -> int:
    """Activation memory an engine needs: device_memory_size_v2 (10.x and 11.x), else the 10.x v1."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)  # TensorRT 10.0: see TRT10_ONLY


class TensorRTRunner:
    """Deserialize a plan, bind torch CUDA tensors, run with execute_async_v3 on a stream."""

    def __init__(self, plan_path: str | Path) -> None:
        import tensorrt as trt
        import torch

        plan_path = Path(plan_path)
        meta = read_sidecar(plan_path)
        check_sidecar(meta, trt.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
        plan = plan_path.read_bytes()
        if meta.get("plan_sha256_16") != hash_bytes(plan):
            raise UserError(f"{plan_path}: the plan does not match its sidecar; rebuild it with `amp-deploy compile`")
        self.runtime = _need(trt.Runtime(logger()), "a runtime")
        self.engine = _need(self.runtime.deserialize_cuda_engine(plan), f"an engine from {plan_path}")
        self.context = _need(self.engine.create_execution_context(), "an execution context")
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.batch_range = (meta["profile"]["min"][0], meta["profile"]["max"][0])
        self.meta = meta

    def device_memory_bytes(self) -> int:
        return device_memory_bytes(self.engine)

    def __call__(self, x):
        import torch

        lo, hi = self.batch_range
        if not lo <= x.shape[0] <= hi:
            raise UserError(f"batch {x.shape[0]} is outside the engine's profile [{lo}, {hi}] (export.batch)")
        x = x.to("cuda", self.dtypes[self.inputs[0]]).contiguous()
        x.record_stream(self.stream)  # not freed (and reused) before the engine has read it
        name = self.inputs[0]
        if _shape(self.context.get_tensor_shape(name)) != tuple(x.shape) and not self.context.set_input_shape(
                name, tuple(x.shape)):
            raise UserError(f"TensorRT refused input shape {tuple(x.shape)} for {name}")
        if not self.context.set_tensor_address(name, x.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of input {name}")
        outs = {}
        for n in self.outputs:
            outs[n] = torch.empty(_shape(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device="cuda")
            if not self.context.set_tensor_address(n, outs[n].data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of output {n}")
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outs[self.outputs[0]]


def _shape(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool, trt.bfloat16: torch.bfloat16}
    return table[trt_dtype]
