"""Runners: one function per runtime that turns a model file into `run(x: ndarray) -> ndarray`.

A runtime that cannot run here raises `Unavailable` with the reason; the report then says
"skipped" with that reason. Nothing is ever reported as passed without having run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    got = session.get_providers()
    if got[0] != providers[0]:
        raise Unavailable(f"onnxruntime gave providers {got}, not {providers[0]}")
    out_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([out_name], {INPUT_NAME: x})[0]

    info = {"version": ort.__version__, "providers": got, "threads": threads or "default"}
    return Runner(run, info)


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
