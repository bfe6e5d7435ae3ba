"""Exceptions that the CLI maps to exit codes, and the checks that raise them from anywhere."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a recipe, a file, a value. The CLI prints it on one line and exits 2."""


class StageFailed(UserError):
    """A stage failed in a way no check foresaw: one line naming the stage and the cause (exit 2;
    `amp-deploy --debug` shows the traceback)."""


class GateFailed(Exception):
    """A validation gate (parity, fidelity, regression) failed. The CLI exits 1."""


class GateUndecided(Exception):
    """A gate could not judge (too few timing rounds, a runtime not measured, a limit on a figure
    the model has not got): never a pass. The CLI exits 3, with the reason and what would resolve it."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message that says something (its type name when the message is
    empty): OpenVINO's messages open with lines that only name a source file ("Exception from
    src/inference/src/cpp/core.cpp:84:"), skipped for the reason beneath them."""
    import re

    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    said = [ln for ln in lines if not re.fullmatch(r"(Exception from \S+:\d+:?|\S+\.(cpp|hpp|h):\d+:?)", ln)]
    return (said or lines or [type(e).__name__])[0][:limit]


def require_finite(t, stage: str) -> None:
    """Stop with a clear error when a model's output holds NaN or Inf."""
    import torch

    if not torch.isfinite(torch.as_tensor(t)).all():
        raise UserError(f"{stage}: the model's output holds NaN or Inf; check the weights and the input images")
