"""OpenVINO on the CPU: the exported ONNX as OpenVINO IR, compiled in a pinned precision, and NNCF's
post-training INT8 quantization.

OpenVINO's CPU plugin picks its own inference precision when none is asked for: bf16 on a CPU with
BF16 units (AVX-512 BF16, AMX), which is a different model from the fp32 one. Every compile here
pins `INFERENCE_PRECISION_HINT` (f32 or bf16), and the runner reports the precision OpenVINO really
executed each matrix product in (the compiled model's runtime graph: `runtimePrecision` of every
FullyConnected / MatMul / Convolution node), never an assumption.

INT8 is NNCF's post-training quantization (`nncf.quantize`, ModelType.TRANSFORMER: SmoothQuant and
the transformer-aware placement that keeps LayerNorm, Softmax and GELU in float), calibrated on the
recipe's calibration images. ONNX Runtime's QDQ file is not a substitute: OpenVINO running it gave
cosine 0.88 to ONNX Runtime's own output on DINOv2 ViT-S/14.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from amp_deploy.errors import UserError, first_line

PRECISION_HINT = {"fp32": "f32", "bf16": "bf16"}  # our names -> OpenVINO's inference precision hints
MATMUL_TYPES = ("FullyConnected", "MatMul", "Convolution", "FullyConnectedCompressed")
INSTALL = "pip install 'amp-deploy[openvino]' (openvino and nncf from PyPI)"


def openvino_problem(int8: bool = False) -> str | None:
    """Why OpenVINO (and, with `int8`, NNCF) cannot be used here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return f"openvino is not installed ({first_line(e)}); {INSTALL}"
    if int8:
        try:
            with _quiet():
                import nncf  # noqa: F401
        except ImportError as e:
            return f"nncf is not installed ({first_line(e)}); {INSTALL}"
    return None


def cpu_capabilities() -> list[str]:
    return list(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_problem() -> str | None:
    """None when this CPU has bf16 units OpenVINO uses; else why bf16 cannot run here."""
    caps = cpu_capabilities()
    if "BF16" not in caps:
        return f"this CPU has no BF16 units OpenVINO can use (its capabilities: {', '.join(caps)})"
    return None


def ir_files(xml: str | Path) -> list[Path]:
    """An IR's two files: the graph (.xml) and the weights (.bin)."""
    xml = Path(xml)
    return [xml, xml.with_suffix(".bin")]


def save_ir(model, xml: str | Path) -> None:
    """Write an ov.Model as IR beside `xml`, whole or not at all: both files are written into a
    temporary folder in the same directory and renamed into place, the weights first. Weights stay
    fp32 (OpenVINO's default would compress them to fp16, which the fp32 row must not measure)."""
    import openvino as ov

    from amp_deploy.files import fault_point, file_mode

    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{xml.stem}.", suffix=".tmpdir", dir=xml.parent))
    try:
        tmp = work / xml.name
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        mode = file_mode()
        for src, dst in ((tmp.with_suffix(".bin"), xml.with_suffix(".bin")), (tmp, xml)):
            os.chmod(src, mode)
            fault_point(dst)
            os.replace(src, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def convert_onnx(onnx_path: str | Path, xml: str | Path) -> dict[str, Any]:
    """The ONNX model as OpenVINO IR (dynamic batch kept); returns what was done, for the report."""
    import openvino as ov

    with _quiet():
        model = ov.convert_model(str(onnx_path))
    save_ir(model, xml)
    return {"converter": "openvino.convert_model", "openvino": ov.__version__, "source": Path(onnx_path).name}


def quantize_nncf(onnx_path: str | Path, xml: str | Path, batches: list[np.ndarray], *,
                  model_type: str | None = "transformer", fast_bias_correction: bool = True) -> dict[str, Any]:
    """NNCF post-training INT8 of the ONNX model (converted to OpenVINO first), calibrated on
    `batches` (every image of them: subset_size is their count); written as IR at `xml`."""
    import openvino as ov

    with _quiet():
        import nncf

        nncf.set_log_level(logging.ERROR)
        model = ov.convert_model(str(onnx_path))
        images = sum(len(b) for b in batches)
        kwargs: dict[str, Any] = {"subset_size": len(batches), "fast_bias_correction": fast_bias_correction}
        if model_type == "transformer":
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        quantized = nncf.quantize(model, nncf.Dataset(batches), **kwargs)
    save_ir(quantized, xml)
    return {"quantizer": "nncf.quantize", "nncf": nncf.__version__, "openvino": ov.__version__,
            "model_type": model_type or "default", "fast_bias_correction": fast_bias_correction,
            "calibration_images": images}


@functools.cache
def core():
    """One OpenVINO Core for the process, alive as long as any model it compiled (OpenVINO's advice:
    one Core per application; a Core dropped while its compiled models live is not what it expects)."""
    import openvino as ov

    return ov.Core()


def compile_ir(xml: str | Path, precision: str, threads: int | None = None):
    """The IR compiled for the CPU with the inference precision pinned (fp32 -> f32, bf16)."""
    if precision not in PRECISION_HINT:
        raise UserError(f"openvino: precision {precision!r}: OpenVINO's CPU runs fp32 or bf16 (INT8 comes from NNCF)")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_HINT[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return core().compile_model(core().read_model(str(xml)), "CPU", config)


def execution_precisions(compiled) -> dict[str, int]:
    """How many matrix products (FullyConnected, MatMul, Convolution) ran in each precision, read from
    the compiled model's runtime graph: {"f32": 0, "bf16": 48, "u8": ...}."""
    out: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in MATMUL_TYPES and "runtimePrecision" in info:
            out[info["runtimePrecision"].astype(str)] += 1
    return dict(sorted(out.items()))


def quantized_matmuls(xml: str | Path) -> dict[str, Any]:
    """An INT8 IR's matrix products by the precision they execute in (compiled in f32 around them):
    {"matmuls": n, "quantized": n (u8/i8), "precisions": {...}}."""
    counts = execution_precisions(compile_ir(xml, "fp32", 1))
    q = sum(n for p, n in counts.items() if p in ("u8", "i8"))
    return {"matmuls": sum(counts.values()), "quantized": q, "precisions": counts}


@contextlib.contextmanager
def _quiet():
    """NNCF draws progress bars and logs INFO lines; the converter warns about its own internals."""
    sink = io.StringIO()
    lg = logging.getLogger("nncf")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        lg.setLevel(level)
