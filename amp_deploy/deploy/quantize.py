"""Post-training quantization of the exported ONNX models, calibrated on real images.

Two quantizers, one per target runtime:
- ONNX Runtime INT8: `onnxruntime.quantization.quantize_static` in QDQ format, per-channel
  weights, after `quant_pre_process` (shape inference and ONNX Runtime's basic graph
  optimisations). Which operators are quantized and the calibration method are settings; the
  defaults were chosen by measurement on a real ViT (benchmarks/quantize_real.py --choices, RESULTS.md).
- TensorRT INT8 / FP8: Q/DQ ONNX from NVIDIA Model Optimizer (`modelopt.onnx.quantization.quantize`),
  calibrated on ONNX Runtime's CPU provider, compiled later as a strongly typed network (the
  graph carries the precision). FP8 Q/DQ cannot run on a CPU: its fidelity is measured on a GPU.

Every output is written atomically: a quantized model appears only when complete.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from amp_deploy.deploy.export import INPUT_NAME, external_files
from amp_deploy.errors import UserError, first_line
from amp_deploy.files import fault_point

Format = Literal["onnxruntime-int8", "tensorrt-int8", "tensorrt-fp8", "openvino-int8"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
MODELOPT_MIN_VERSION = (0, 33)  # the ONNX quantize() with calibration_data_reader and calibration_eps
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper and later: FP8 tensor cores
# Operators ONNX Runtime quantizes by default (the matrix products). The rest of a ViT (LayerNorm,
# Softmax, GELU, residual adds, reshapes) stays in float: measured in RESULTS.md.
DEFAULT_ORT_OPS = ("MatMul", "Gemm", "Conv")
NOTHING_QUANTIZED = "no matrix product is quantized: the model is float with quantize/dequantize pairs around it"


def precision_of(fmt: str) -> str:
    """The numeric precision a format computes in: int8 or fp8."""
    return fmt.rsplit("-", 1)[1]


def runtime_of(fmt: str) -> str:
    """The runtime a format is made for (the recipe must list it)."""
    return fmt.rsplit("-", 1)[0]


class CalibrationReader:
    """Calibration batches for both quantizers: ONNX Runtime's CalibrationDataReader protocol
    (`get_next()` -> {input name: batch} or None) over a fixed list of numpy batches.

    Model Optimizer accepts the same reader (its `calibration_data_reader`), and may read it more
    than once: `rewind()` starts it over.
    """

    def __init__(self, batches: list[np.ndarray]) -> None:
        if not batches:
            raise UserError("quantize: no calibration image could be read")
        self.batches = batches
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x}

    def get_first(self) -> dict[str, np.ndarray]:
        """The first batch without advancing (Model Optimizer's test run)."""
        return {INPUT_NAME: self.batches[0]}

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)


def calibration_batches(batches: Iterable[tuple[Any, Any]], count: int, batch_max: int) -> list[np.ndarray]:
    """The first `count` images of a split's `batches()` as float32 numpy batches of at most
    `batch_max` (the export's largest batch), in order."""
    out, have = [], 0
    for x, _ in batches:
        x = x.float().numpy() if hasattr(x, "numpy") else np.asarray(x, np.float32)
        x = x[: count - have]
        for i in range(0, len(x), batch_max):
            out.append(np.ascontiguousarray(x[i : i + batch_max], dtype=np.float32))
        have += len(x)
        if have >= count:
            break
    return out


def _ort_quant():
    """ONNX Runtime's quantization API, when onnxruntime has it."""
    try:
        from onnxruntime import quantization as q
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise UserError(f"quantize: onnxruntime.quantization is not importable ({first_line(e)})") from None
    import onnxruntime

    # the sessions the quantizer and its pre-processing open themselves take the default logger, whose
    # native warnings ("Removing initializer ...") reach the terminal past any Python redirection
    onnxruntime.set_default_logger_severity(3)
    return q, quant_pre_process


def op_counts(path: str | Path) -> dict[str, int]:
    """Operator type -> count of one ONNX model (what a pass changed, for the report)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI). Without it ONNX Runtime's u8 x s8 kernels
    (VPMADDUBSW) saturate, so weights are quantized to 7 bits (`reduce_range`, ONNX Runtime's advice for
    such CPUs): on an AVX2-only EPYC full-range INT8 gave the quickstart cosine 0.93 (min -0.26) to fp32.
    Unknown (no /proc/cpuinfo) or no AVX2 (not that kernel): True, full range kept."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")) or "avx2" not in flags


def quantize_onnxruntime(src: str | Path, dst: str | Path, reader: CalibrationReader, *,
                         method: CalibrationMethod = "percentile", per_channel: bool = True,
                         op_types: tuple[str, ...] | list[str] | None = DEFAULT_ORT_OPS, preprocess: bool = True,
                         activation: Literal["uint8", "int8"] = "uint8") -> dict[str, Any]:
    """Static INT8 QDQ quantization with ONNX Runtime; returns what was done (for the report).

    `op_types`: the operator types quantized (None: every one ONNX Runtime can). `preprocess` runs `quant_pre_process` first (symbolic shape inference is skipped: the ViT's
    shapes are static but for the batch; ONNX Runtime's basic optimisations fold constants and
    fuse what it can before the quantizer sees the graph).
    """
    q, quant_pre_process = _ort_quant()
    src, dst = Path(src).resolve(), Path(dst).resolve()  # the quantizer runs in its own working folder
    methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
               "percentile": q.CalibrationMethod.Percentile}
    types = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}
    reduce_range = not cpu_has_vnni()
    work = _workdir(dst)
    try:
        before = op_counts(src)
        big = _external(src)
        source = Path(src)
        if preprocess:
            source = work / "preprocessed.onnx"
            with _quiet():
                quant_pre_process(str(src), str(source), skip_symbolic_shape=True, save_as_external_data=big)
        after_pre = op_counts(source)
        reader.rewind()
        out = work / dst.name
        with _quiet(), _in(work):  # the calibrator writes its augmented model into the working folder
            q.quantize_static(str(source), str(out), reader, quant_format=q.QuantFormat.QDQ,
                              per_channel=per_channel, activation_type=types[activation],
                              weight_type=q.QuantType.QInt8, reduce_range=reduce_range,
                              op_types_to_quantize=None if op_types is None else list(op_types),
                              calibrate_method=methods[method], use_external_data_format=big)
        _place(out, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"quantizer": "onnxruntime.quantization", "format": "QDQ", "method": method, "per_channel": per_channel,
            "reduce_range": reduce_range,
            "activations": activation, "weights": "int8",
            "op_types": "all" if op_types is None else list(op_types),
            "preprocess": {"ran": preprocess, "ops_before": before, "ops_after": after_pre,
                           "changed": _diff(before, after_pre)},
            "calibration_images": len(reader), "ops": op_counts(dst)}


def modelopt_version() -> tuple[int, ...] | None:
    """Model Optimizer's version as a tuple, or None when it is not installed."""
    import importlib.metadata

    try:
        v = importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def modelopt_problem() -> str | None:
    """Why Model Optimizer's ONNX quantization can't be used here, or None when it can."""
    v = modelopt_version()
    if v is None:
        return "nvidia-modelopt is not installed (pip install 'amp-deploy[modelopt]')"
    if v[:2] < MODELOPT_MIN_VERSION:
        return (f"nvidia-modelopt {'.'.join(map(str, v))} is too old: the ONNX quantize() with a calibration reader "
                f"and calibration providers needs >= {'.'.join(map(str, MODELOPT_MIN_VERSION))}")
    try:
        from modelopt.onnx.quantization import quantize
    except Exception as e:  # noqa: BLE001 - any import failure means the API is not usable here
        return f"modelopt.onnx.quantization cannot be imported ({type(e).__name__}: {first_line(e, 200)})"
    needed = {"quantize_mode", "calibration_data_reader", "calibration_eps", "output_path", "high_precision_dtype"}
    missing = needed - set(inspect.signature(quantize).parameters)
    if missing:
        return f"this nvidia-modelopt's ONNX quantize() lacks {', '.join(sorted(missing))}"
    return None


def quantize_modelopt(src: str | Path, dst: str | Path, reader: CalibrationReader, *,
                      precision: Literal["int8", "fp8"], method: str | None = None) -> dict[str, Any]:
    """Q/DQ ONNX for TensorRT with NVIDIA Model Optimizer, calibrated on ONNX Runtime's CPU provider.

    The high-precision parts stay fp16 (Model Optimizer's default for TensorRT: a strongly typed
    engine then runs them in fp16), as its ViT examples do. It runs in a child process: Model
    Optimizer patches onnxruntime.quantization's calibrators in the process that imports it (after
    which ONNX Runtime's own percentile calibration fails), and it rewrites the model file it is
    given, so it gets a copy in a private folder.
    """
    import subprocess
    import sys

    if problem := modelopt_problem():
        raise UserError(f"quantize: {problem}")
    src, dst = Path(src).resolve(), Path(dst).resolve()  # the child runs in its own working folder
    work = _workdir(dst)
    try:
        source = work / "source.onnx"
        shutil.copyfile(src, source)
        for data in external_files(src):
            shutil.copyfile(data, work / data.name)
        np.savez(work / "calibration.npz", *reader.batches)
        out = work / dst.name
        cmd = [sys.executable, "-m", "amp_deploy.deploy.quantize", str(source), str(out), str(work / "calibration.npz"),
               precision, method or "", "external" if _external(src) else ""]
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.is_file():
            tail = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
            raise RuntimeError(f"Model Optimizer's {precision} quantization failed (exit {done.returncode}): {tail[0]}")
        _place(out, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"quantizer": f"nvidia-modelopt {'.'.join(map(str, modelopt_version() or ()))}", "format": "QDQ",
            "precision": precision, "method": method or "default", "high_precision": "fp16",
            "calibration_images": len(reader), "ops": op_counts(dst)}


def _modelopt_main(argv: list[str]) -> None:
    """The child process of `quantize_modelopt`: SOURCE OUT CALIBRATION.npz PRECISION [METHOD]."""
    source, out, calibration, precision, method, external = argv
    from modelopt.onnx.quantization import quantize

    with np.load(calibration, allow_pickle=False) as z:
        reader = CalibrationReader([z[f"arr_{i}"] for i in range(len(z.files))])
    with _quiet():
        quantize(source, quantize_mode=precision, calibration_data_reader=reader, calibration_eps=["cpu"],
                 calibration_method=method or None, output_path=out, log_level="ERROR",
                 use_external_data_format=external == "external")


def _workdir(dst: Path) -> Path:
    """A private folder beside `dst` (a build's stray-temp sweep removes it if the process dies). Its
    name holds no ".onnx": Model Optimizer derives scratch paths by replacing ".onnx" in the whole path."""
    return Path(tempfile.mkdtemp(prefix=f".{dst.stem}-", suffix=".tmpdir", dir=dst.parent))


def _external(path: str | Path) -> bool:
    """The model keeps its weights in external data files (over protobuf's 2 GB): so must its copies."""
    return bool(external_files(path))


def _place(out: Path, dst: Path) -> None:
    """Check the quantizer's output, then move it and its external data files (named after it by
    both quantizers) beside `dst`: data first, the .onnx last, so it appears only when complete."""
    import onnx

    onnx.checker.check_model(str(out), full_check=False)  # by path: external data is found beside it
    for data in sorted(p for p in out.parent.iterdir() if p.name.startswith(out.name) and p != out):
        os.replace(data, dst.parent / (dst.name + data.name[len(out.name):]))
    fault_point(dst)
    os.replace(out, dst)


def _diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Operator counts that a pass changed: type -> after - before."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
            if after.get(k, 0) != before.get(k, 0)}


# --- where the Q/DQ nodes are -------------------------------------------------------------------

_PASS_THROUGH = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Cast", "Identity",
                 "Flatten", "Concat"}
_BLOCK = re.compile(r"(?:blocks|layers?|resblocks)[./_](\d+)\b")


def block_of_nodes(path: str | Path) -> dict[str, int]:
    """Node name -> transformer block index, from the torch exporter's `namespace` metadata (the
    module path, e.g. blocks.3.mlp.fc1 or encoder.layer.3.mlp.fc1) of an fp32 export. The
    quantizers keep node names but drop that metadata, so the fp32 export names the blocks."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for n in model.graph.node:
        where = " ".join(p.value for p in n.metadata_props if p.key == "namespace") or n.name
        if m := _BLOCK.search(where):
            out[n.name] = int(m.group(1))
    return out


def _quantized_input(name: str, producers: dict[str, Any], depth: int = 4) -> bool:
    """Whether a tensor comes from a DequantizeLinear, directly or through up to `depth` shape-only
    operators (Transpose, Reshape, ...)."""
    node = producers.get(name)
    for _ in range(depth):
        if node is None:
            return False
        if node.op_type == "DequantizeLinear":
            return True
        if node.op_type not in _PASS_THROUGH or not node.input:
            return False
        node = producers.get(node.input[0])
    return False


def matmul_coverage(path: str | Path, reference: str | Path) -> dict[str, Any]:
    """Each block's matrix products and whether both inputs of each are quantized (come from a
    DequantizeLinear). NVIDIA's placement for ViTs (TensorRT's Q/DQ guidance, Model Optimizer's
    defaults) quantizes the inputs of every MatMul/Gemm: QKV, the two attention products, the
    output projection and both MLP layers; residual adds, LayerNorm and Softmax stay in float.

    `reference`: the fp32 export it was made from (names the blocks, see `block_of_nodes`).
    Returns {"blocks": {index: {"matmuls": n, "quantized": n, "float": [node names]}}, "outside": {...}}.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    block_of = block_of_nodes(reference)
    blocks: dict[int, dict[str, Any]] = {}
    outside = {"matmuls": 0, "quantized": 0, "float": []}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        block = block_of.get(n.name)
        entry = outside if block is None else blocks.setdefault(block, {"matmuls": 0, "quantized": 0, "float": []})
        entry["matmuls"] += 1
        if all(_quantized_input(t, producers) for t in n.input[:2]):
            entry["quantized"] += 1
        else:
            entry["float"].append(n.name)
    return {"blocks": dict(sorted(blocks.items())), "outside": outside}


def ort_quantizable_ops() -> set[str]:
    """The operator types ONNX Runtime's static quantizer has QDQ or QLinear rules for."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def quantized_matmuls(coverage: dict[str, Any]) -> int:
    """How many matrix products of the graph (in blocks or outside them) have both inputs quantized."""
    return sum(b["quantized"] for b in coverage["blocks"].values()) + coverage["outside"]["quantized"]


def coverage_problems(coverage: dict[str, Any], per_block: int | None = None) -> list[str]:
    """What is not quantized as it should be: a block with a float matrix product, or blocks with
    fewer matrix products than `per_block` (when given)."""
    out = []
    for i, b in coverage["blocks"].items():
        if b["float"]:
            out.append(f"block {i}: {len(b['float'])} of {b['matmuls']} matrix products in float ({', '.join(b['float'][:3])})")
        if per_block is not None and b["matmuls"] != per_block:
            out.append(f"block {i}: {b['matmuls']} matrix products, expected {per_block}")
    if not coverage["blocks"]:
        out.append("no transformer block found by name in the graph")
    if not quantized_matmuls(coverage):
        out.append(NOTHING_QUANTIZED)
    return out


# --- plumbing -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _in(folder: Path):
    """Run in `folder` (the quantizers write scratch files into the working directory)."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _quiet():
    """The quantizers print progress bars and INFO lines meant for their developers."""
    sink = io.StringIO()
    names = ("modelopt", "onnxruntime", "root", "polygraphy", "onnx2torch")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


if __name__ == "__main__":
    import sys

    _modelopt_main(sys.argv[1:])

