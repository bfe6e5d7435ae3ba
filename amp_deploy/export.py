"""ONNX export with a dynamic batch axis, the exporter and opset pinned by the caller.

`torch.onnx.export` changed its defaults (dynamo=True and opset 20 since PyTorch 2.9), so both are
always passed explicitly. Opset >= 17 keeps LayerNorm as one LayerNormalization node, which
TensorRT maps to its normalization layer (the fp16 overflow trap of decomposed LayerNorm).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Literal

import torch

from amp_deploy._private import atomic_path

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "output"
EXTERNAL_DATA_LIMIT = 1 << 31  # protobuf's 2 GB cap on one file


def export_onnx(model: torch.nn.Module, path: str | Path, input_size: tuple[int, int, int], opset: int,
                batch_min: int, batch_opt: int, batch_max: int,
                exporter: Literal["dynamo", "torchscript"] = "dynamo") -> Path:
    """Export `model` (eval, fp32, on CPU) to `path` atomically and run onnx.checker on the result."""
    import onnx

    path = Path(path)
    model = model.eval()
    example = torch.randn(max(batch_opt, 2), *input_size)  # batch 1 would be specialised away
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    external = size >= EXTERNAL_DATA_LIMIT - (64 << 20)
    with atomic_path(path) as tmp, _quiet():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=batch_min, max=batch_max)
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: batch},), external_data=external, optimize=True,
                              verbose=False)
        else:
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        onnx.checker.check_model(str(tmp), full_check=True)  # by path: works past 2 GB too
    return path


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings meant for their developers; keep the CLI clean."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
