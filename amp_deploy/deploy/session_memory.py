"""Peak host memory of one runtime session, measured in a fresh process.

Measured in the process that already ran other sessions, a session can reuse pages the C heap kept
from freed ones and read as needing almost nothing (0.1 MiB for ONNX Runtime holding a 22M-parameter
ViT); handing those pages back first (malloc_trim, mallopt) crashed later sessions in glibc's
allocator. So each session is opened in a child process of its own: Python, numpy and the runtime's
library are imported first (what every process pays, nobody's model), then the high-water mark is
reset (/proc/self/clear_refs) and the session is created and run once at the given batch shape. The
figure is the rise of VmHWM over the resident set before: the model's memory in that runtime, its
arena and one batch's activations. Linux only; elsewhere None.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TIMEOUT_S = 900.0  # a 4B-parameter model's session takes minutes to open on a CPU


@dataclass(frozen=True)
class SessionSpec:
    """What a child process needs to open the session again: plain values only."""

    runtime: str  # "onnxruntime" (CPU provider) or "openvino" (CPU plugin)
    path: str  # the .onnx file, or the IR's .xml
    threads: int | None = None
    precision: str = "fp32"  # OpenVINO's pinned inference precision


def start(spec: SessionSpec, shape: tuple[int, ...]) -> subprocess.Popen:
    """Start the child that measures `spec` on a float32 batch of `shape`; read it with `result`."""
    arg = json.dumps({"spec": asdict(spec), "shape": list(shape)})
    return subprocess.Popen([sys.executable, "-m", "amp_deploy.deploy.session_memory", arg],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(child: subprocess.Popen) -> tuple[int | None, str | None]:
    """(peak bytes, None), or (None, why it could not be measured)."""
    try:
        out, err = child.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return None, f"the measuring process took over {TIMEOUT_S:.0f} s"
    lines = out.strip().splitlines()
    if child.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        return None, f"the measuring process failed: {tail[:300]}"
    got = json.loads(lines[-1])
    return got["host_peak_bytes"], got.get("reason")


def host_peak(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run fn; return its result and the peak resident memory it added to this process (bytes).

    Linux: the high-water mark is reset through /proc/self/clear_refs, then read from VmHWM. None
    where that is not available.
    """
    import gc

    # Freed pages stay in the C heap, so a session may reuse an earlier one's and read as needing little:
    # handing them back (malloc_trim, or mallopt's M_MMAP_THRESHOLD) was tried and each time a process
    # later crashed in glibc's allocator (DINOv2 validate under OpenVINO; a test worker), so it is not done:
    # sessions are measured in a child of their own instead (`start`).
    gc.collect()
    try:
        base = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return fn(), None
    result = fn()
    return result, max(0, _status_kb("VmHWM") - base) * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def open_runner(spec: SessionSpec):
    """The runner `spec` describes (the validate rows open theirs the same way)."""
    from amp_deploy.deploy import runtimes as R

    if spec.runtime == "onnxruntime":
        return R.onnxruntime_runner(spec.path, spec.threads)
    if spec.runtime == "openvino":
        return R.openvino_runner(spec.path, spec.threads, spec.precision)
    raise ValueError(f"no CPU session for runtime {spec.runtime!r}")


def _child(spec: SessionSpec, shape: list[int]) -> dict:
    import importlib

    import numpy as np

    import amp_deploy.deploy.runtimes  # noqa: F401 - torch and the runner code: every process pays them

    importlib.import_module(spec.runtime)  # the library's own set-up is not the session's
    x = np.zeros(shape, dtype=np.float32)
    _, peak = host_peak(lambda: open_runner(spec).run(x))
    if peak is None:
        return {"host_peak_bytes": None, "reason": "no resident-set high-water mark here (/proc/self/clear_refs, VmHWM)"}
    return {"host_peak_bytes": peak}


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps(_child(SessionSpec(**request["spec"]), request["shape"])))
