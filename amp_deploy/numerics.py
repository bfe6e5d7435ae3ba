"""Numerics policy for fp32 references, applied where references are computed, never globally."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def fp32_reference() -> Iterator[None]:
    """TF32 off for matrix products and convolutions inside the block, restored after it.

    An fp32 reference (parity baselines, fidelity, the search's losses, eager torch latency) computed
    with TF32 would carry 10-bit-mantissa rounding into every figure compared against it. The CLI, the
    torchrun worker, the benchmarks and Python callers all pass through the code that uses this.
    """
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def median_ratio(samples: list[float], base: list[float]) -> float:
    """The median over rounds of `samples[i] / base[i]`: two runners timed interleaved, round by round."""
    import numpy as np

    return float(np.median(np.asarray(samples) / np.asarray(base)))
