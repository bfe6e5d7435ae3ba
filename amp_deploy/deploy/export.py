"""ONNX export with a dynamic batch axis, the exporter and opset pinned by the caller.

`torch.onnx.export` changed its defaults (dynamo=True and opset 20 since PyTorch 2.9), so both are
always passed explicitly. Opset >= 17 keeps LayerNorm as one LayerNormalization node, which
TensorRT maps to its normalization layer. A half-precision export keeps every LayerNorm in fp32
(cast in, cast out): LayerNorm overflows in fp16 in transformers (TensorRT issues 2564, 3101,
4493), and a strongly typed TensorRT network follows the graph's types exactly.

Models over 2 GB (protobuf's limit) are written with external data: `NAME.onnx` plus its data
file beside it, both renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from amp_deploy.files import fault_point

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "output"
EXTERNAL_DATA_LIMIT = 1 << 31  # protobuf's 2 GB cap on one file
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Precision = Literal["fp32", "fp16", "bf16"]  # of an export, an engine, a runtime row
Exporter = Literal["dynamo", "torchscript"]


class Fp32LayerNorm(nn.Module):
    """A LayerNorm that computes in fp32 whatever the dtype around it."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def in_dtype(model: nn.Module, precision: str) -> nn.Module:
    """A copy of `model` in fp16/bf16 with its LayerNorms kept in fp32 (the model itself for fp32)."""
    if precision == "fp32":
        return model
    model = copy.deepcopy(model).to(DTYPES[precision])
    for _, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(mod, child_name, Fp32LayerNorm(child))
    return model


def export_onnx(model: nn.Module, path: str | Path, input_size: tuple[int, int, int], *, opset: int = 18,
                batch_min: int = 1, batch_opt: int = 8, batch_max: int = 32, exporter: Exporter = "dynamo",
                precision: Precision = "fp32") -> Path:
    """Export `model` (eval, on CPU) to `path` atomically and run onnx.checker on the result.

    Args:
        model: the module to export; left as it is (a half-precision export works on a copy).
        path: the .onnx file; an external data file goes beside it for models over 2 GB.
        input_size: (channels, height, width) of one image.
        opset: ONNX opset (>= 17 keeps LayerNorm one node).
        batch_min, batch_opt, batch_max: the dynamic batch axis' range (opt: the example's batch).
        exporter: torch.onnx's dynamo exporter or the TorchScript one, always named explicitly.
        precision: fp32, or fp16/bf16 with every LayerNorm kept in fp32.

    Returns:
        `path`.
    """
    import onnx

    path = Path(path)
    model = in_dtype(model.eval(), precision)
    example = torch.randn(max(batch_opt, 2), *input_size, dtype=DTYPES[precision])  # batch 1 is specialised away
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    external = size >= EXTERNAL_DATA_LIMIT - (64 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export into a private folder, so an external data file gets its final name from the start.
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent))
    try:
        target = work / path.name
        with _quiet():
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=batch_min, max=batch_max)
                torch.onnx.export(model, (example,), str(target), dynamo=True, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({0: batch},), external_data=external, optimize=True,
                                  verbose=False)
            else:
                torch.onnx.export(model, (example,), str(target), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            onnx.checker.check_model(str(target), full_check=True)  # by path: works past 2 GB too
        data_files = [p for p in work.iterdir() if p.name != path.name]
        for p in data_files:  # data first: the .onnx appears only when everything it needs is there
            os.replace(p, path.parent / p.name)
        fault_point(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def external_files(path: str | Path) -> list[Path]:
    """Data files an ONNX model refers to (empty when its weights are inside it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names |= {e.value for e in t.external_data if e.key == "location"}
    return [Path(path).parent / n for n in sorted(names)]


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
