"""Runners: one function per runtime that turns a model file into `run(x: ndarray) -> ndarray`.

A runtime that cannot run here raises `Unavailable` with the reason; the report then says
"skipped" with that reason. Nothing is ever reported as passed without having run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amp_deploy._private import first_line
from amp_deploy.export import INPUT_NAME

Run = Callable[[np.ndarray], np.ndarray]


class Unavailable(Exception):
    """This runtime cannot run on this machine; the message says why."""


@dataclass
class Runner:
    run: Run
    info: dict[str, Any] = field(default_factory=dict)  # providers, threads, versions: for the report
    sync: Callable[[], None] | None = None  # waits for the device; part of the host latency
    events: bool = False  # time on the device with CUDA events too


def onnxruntime_runner(path: str | Path, threads: int | None = None,
                       providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Runner:
    """An ONNX Runtime session; the providers recorded are those the session really got."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Unavailable(f"onnxruntime is not installed ({e})") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted == "CPUExecutionProvider":
        session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    else:
        try:
            with _quiet_native():  # a missing CUDA/TensorRT library is reported below, not on the console
                session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises plain RuntimeErrors for missing libraries
            raise Unavailable(f"onnxruntime could not start {wanted}: {first_line(e)}") from None
    got = session.get_providers()  # what the session really got, not what onnxruntime lists
    if got[0] != wanted:
        raise Unavailable(f"onnxruntime did not give {wanted} (the session got {got}): "
                          "no usable GPU or CUDA/TensorRT libraries here")
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

    info = {"version": ort.__version__, "providers": got, "threads": threads or "default"}
    return Runner(run, info)


def cuda_providers() -> tuple:
    """ONNX Runtime's CUDA provider with TF32 off: fp32 figures and a tight parity baseline."""
    return (("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider")


def tensorrt_providers(cache_dir: str | Path, fp16: bool) -> tuple:
    """ONNX Runtime's TensorRT provider, its engine and timing caches kept in the output folder."""
    opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir), "trt_fp16_enable": fp16}
    return (("TensorrtExecutionProvider", opts),) + cuda_providers()


@contextlib.contextmanager
def _quiet_native():
    """Silence onnxruntime's own stderr while a session is created (C++ logging bypasses Python)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tensorrt_runner(plan: str | Path) -> Runner:
    from amp_deploy.tensorrt_engine import TensorRTRunner

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
        return model(torch.from_numpy(x).to(device, non_blocking=True)).float().cpu().numpy()

    cuda = device.type == "cuda"
    info = {"version": torch.__version__, "mode": "eager", "device": str(device), "threads": torch.get_num_threads()}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(device)
    return Runner(run, info, sync=torch.cuda.synchronize if cuda else None, events=cuda)


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can (tensorrt imports and a GPU is present)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"tensorrt Python package is not installed ({e}); install the 'tensorrt' extra from NVIDIA's index"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (TensorRT engines need one)"
    return None
