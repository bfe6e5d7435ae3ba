"""Runners: one function per runtime that turns a model file into `run(x: ndarray) -> ndarray`.

A runtime that cannot run here raises `Unavailable` with the reason; the report then says
"skipped" with that reason. Nothing is ever reported as passed without having run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from amp_deploy.deploy.export import INPUT_NAME
from amp_deploy.errors import first_line
from amp_deploy.numerics import fp32_reference

Run = Callable[[np.ndarray], np.ndarray]
RuntimeName = Literal["onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "torch", "torch-compile",
                      "openvino", "openvino-bf16"]
OPENVINO_RUNTIMES = {"openvino": "fp32", "openvino-bf16": "bf16"}  # runtime name -> the precision it pins


class Unavailable(Exception):
    """This runtime cannot run on this machine; the message says why."""


@dataclass
class Runner:
    """A model file made runnable: `run(x) -> y` on numpy arrays, and what the report says of it."""

    run: Run
    info: dict[str, Any] = field(default_factory=dict)  # providers, threads, versions: for the report
    sync: Callable[[], None] | None = None  # waits for the device; part of the host latency
    events: bool = False  # time on the device with CUDA events too


def onnxruntime_runner(path: str | Path, threads: int | None = None,
                       providers: tuple = ("CPUExecutionProvider",)) -> Runner:
    """An ONNX Runtime session; the providers recorded are those the session really got.

    onnxruntime-gpu lists the CUDA and TensorRT providers as available even with no GPU, and falls
    back to the CPU when their libraries are missing: `session.get_providers()` is what counts, and
    a GPU provider not got is `Unavailable`, naming the library that failed to load.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Unavailable(f"onnxruntime is not installed ({e})") from None
    ort.set_default_logger_severity(3)  # native warnings of sessions opened without these options, too
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted == "CPUExecutionProvider":
        session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    else:
        session = _gpu_session(ort, path, opts, providers, wanted)
    out_name = session.get_outputs()[0].name
    if wanted == "CPUExecutionProvider":
        def run(x: np.ndarray) -> np.ndarray:
            return session.run([out_name], {INPUT_NAME: x})[0]
    else:
        binding = session.io_binding()  # output stays on the device until copied back

        def run(x: np.ndarray) -> np.ndarray:
            binding.bind_cpu_input(INPUT_NAME, x)
            binding.bind_output(out_name, "cuda")
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

    info = {"version": ort.__version__, "providers": session.get_providers(), "threads": threads or "default"}
    return Runner(run, info)


def _gpu_session(ort, path, opts, providers: tuple, wanted: str):
    """A session on the CUDA or TensorRT provider, with their libraries found first; else Unavailable."""
    if wanted == "TensorrtExecutionProvider":
        with contextlib.suppress(ImportError, OSError):
            import tensorrt  # noqa: F401 - a pip-installed TensorRT puts libnvinfer where ORT can find it
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA and cuDNN from the nvidia-* wheels
        with contextlib.suppress(Exception), _captured_native():
            ort.preload_dlls()
    try:
        with _captured_native() as log:  # a missing CUDA/TensorRT library is reported below, not on the console
            session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises plain RuntimeErrors for missing libraries
        raise Unavailable(f"onnxruntime could not start {wanted}: {first_line(e)}") from None
    got = session.get_providers()  # what the session really got, not what onnxruntime lists
    if got[0] != wanted:
        missing = missing_libraries(log.getvalue())
        why = (f"a library failed to load: {', '.join(missing)}" if missing
               else "no usable GPU or CUDA/TensorRT libraries here")
        raise Unavailable(f"onnxruntime did not give {wanted} (the session got {got}): {why}")
    return session


def missing_libraries(log: str) -> list[str]:
    """Shared libraries named in loader errors ("libcurand.so.10: cannot open shared object file")."""
    import re

    return sorted(set(re.findall(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", log)))


def cuda_providers() -> tuple:
    """ONNX Runtime's CUDA provider with TF32 off: fp32 figures and a tight parity baseline."""
    return (("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider")


def tensorrt_providers(cache_root: str | Path, onnx_path: str | Path, fp16: bool,
                       profile: tuple[list[int], list[int], list[int]] | None = None) -> tuple:
    """ONNX Runtime's TensorRT provider, its engine and timing caches kept in the output folder.

    ONNX Runtime's engine cache id hashes the model's path and names, not its weights or shapes, so
    a re-pruned model in the same folder would run the old engine: the cache lives in one folder per
    ONNX content hash. `profile` (min, opt, max input shapes) gives the provider the export's batch
    range instead of letting it rebuild for every new batch size.
    """
    from amp_deploy.files import hash_file

    cache = Path(cache_root) / hash_file(onnx_path)
    opts: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                            "trt_fp16_enable": fp16}
    if profile is not None:
        for key, shape in zip(("min", "opt", "max"), profile):
            opts[f"trt_profile_{key}_shapes"] = f"{INPUT_NAME}:{'x'.join(map(str, shape))}"
    return (("TensorrtExecutionProvider", opts),) + cuda_providers()


@contextlib.contextmanager
def _captured_native():
    """Capture the process' own stderr (onnxruntime's C++ logging bypasses Python) into a buffer."""
    import io
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    buf = io.StringIO()
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield buf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            buf.write(sink.read())


def openvino_runner(xml: str | Path, threads: int | None = None, precision: str = "fp32") -> Runner:
    """OpenVINO's CPU plugin on an IR, with the inference precision pinned (fp32 or bf16; an INT8 IR
    from NNCF runs its quantized products in int8 and the rest in the pinned precision). The info
    says which precision each matrix product really executed in."""
    from amp_deploy.deploy import openvino as OV

    if problem := OV.openvino_problem():
        raise Unavailable(problem)
    if precision == "bf16" and (problem := OV.bf16_problem()):
        raise Unavailable(problem)
    import openvino as ov

    compiled = OV.compile_ir(xml, precision, threads)
    request = compiled.create_infer_request()
    out = compiled.outputs[0]

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer({0: x})[out], dtype=np.float32)

    info = {"version": ov.__version__, "device": "CPU", "threads": threads or "default",
            "inference_precision_hint": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "execution_precision": OV.execution_precisions(compiled)}
    return Runner(run, info)


def tensorrt_runner(plan: str | Path) -> Runner:
    from amp_deploy.deploy.tensorrt_engine import TensorRTRunner

    if reason := tensorrt_unavailable_reason():
        raise Unavailable(reason)
    engine = TensorRTRunner(plan)

    def run(x: np.ndarray) -> np.ndarray:
        return engine(torch.from_numpy(x)).float().cpu().numpy()

    info = {"tensorrt": engine.meta["tensorrt"], "gpu": engine.meta["gpu"], "precision": engine.meta["settings"]["precision"],
            "device_memory_bytes": engine.device_memory_bytes()}
    return Runner(run, info, sync=torch.cuda.synchronize, events=True)


def torch_runner(model: torch.nn.Module, threads: int | None = None,
                 device: torch.device = torch.device("cpu")) -> Runner:
    """Eager PyTorch in fp32: the baseline a user would otherwise deploy.

    On CUDA the input is copied to the device inside the timed call (as a server would) and the
    output back; TF32 is left off so the figures are fp32 figures.
    """
    model = model.eval().to(device)
    if threads:
        torch.set_num_threads(threads)

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        with fp32_reference():
            return model(torch.from_numpy(x).to(device, non_blocking=True)).float().cpu().numpy()

    cuda = device.type == "cuda"
    info = {"version": torch.__version__, "mode": "eager", "device": str(device), "threads": torch.get_num_threads()}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(device)
    return Runner(run, info, sync=torch.cuda.synchronize if cuda else None, events=cuda)


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can (tensorrt loads and a GPU is present)."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the bindings are there, libnvinfer is not
        return f"tensorrt Python package is not installed ({e}); install the 'tensorrt' extra from NVIDIA's index"
    if not hasattr(tensorrt, "Builder"):  # e.g. a stubs-only install: a namespace package with no API
        return f"the tensorrt package at {list(getattr(tensorrt, '__path__', []))} has no TensorRT API (stubs only?)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (TensorRT engines need one)"
    return None
