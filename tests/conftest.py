"""Shared fixtures: tiny models from the real factories, fixed seeds."""

from __future__ import annotations

import json
import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker process, and per child it starts
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

def requires_cuda(fn):
    """Marked `gpu`; skipped, with the reason, where no CUDA device is present."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


def has_trt() -> bool:
    """The tensorrt package imports and a CUDA device is present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def requires_trt(fn):
    """Marked `trt`; skipped, with the reason, where tensorrt or a CUDA device is missing."""
    return pytest.mark.trt(pytest.mark.skipif(not has_trt(), reason="needs the tensorrt package and a CUDA device")(fn))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_vit():
    """timm's own test ViT, shrunk: 3 blocks, 32x32 images, 10 classes."""
    from amp_deploy.prune.families import load_timm

    return load_timm("test_vit", False, {"depth": 3, "img_size": 32, "num_classes": 10})


@pytest.fixture
def digits_model():
    from amp_deploy import digits
    from amp_deploy.prune.families import load_timm

    return load_timm(digits.MODEL_NAME, str(digits.ASSET), digits.MODEL_KWARGS)


FAST = ["validate.iterations=5", "validate.warmup=2"]


def assert_one_line_error(res, needle):
    """Exit 2 with one line that says what is wrong, and no traceback."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.output
    assert "Traceback" not in res.output


def build(*args):
    from typer.testing import CliRunner

    from amp_deploy.cli import app

    return CliRunner().invoke(app, ["build", *map(str, args)])


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """One uninterrupted quickstart build (fast latency settings): (folder, console output)."""
    out = tmp_path_factory.mktemp("qs") / "out"
    res = build(QUICKSTART, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    return out, res.output


def tiny_recipe(tmp_path, **sections) -> "Path":
    """A small recipe over timm's test_vit and synthetic images; `sections` replace recipe keys."""
    import yaml

    doc = {
        "name": "tiny",
        "model": {"source": "timm", "name": "test_vit", "kwargs": {"depth": 2, "img_size": 32, "num_classes": 10}},
        "data": {"source": "synthetic", "calibration": 16, "validation": 16, "holdout": 8, "batch_size": 8},
        "prune": {"threshold": 0.05, "steps": 3},
        "export": {"batch": {"min": 1, "opt": 2, "max": 4}},
        "runtimes": ["onnxruntime"],
        "validate": {"batch_sizes": [1], "warmup": 1, "iterations": 3},
    }
    for key, value in sections.items():
        doc[key] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


from amp_deploy.prune.families import spread_init  # noqa: E402,F401 - re-exported for the tests


def assert_not_degenerate(outputs: torch.Tensor | None = None, scores: list[torch.Tensor] | None = None,
                          widths: list[int] | None = None, floor: list[int] | None = None) -> None:
    """What a pruning check on a random-init model needs: features that differ between images, scores
    that are not all ~0, and (after a search) widths not all at the search's floor."""
    if outputs is not None:
        f = torch.nn.functional.normalize(outputs.float().flatten(1), dim=-1)
        off = (f @ f.T)[~torch.eye(len(f), dtype=torch.bool)]
        assert off.mean() < 0.99 and off.std() > 1e-3, f"features all alike: cosines {off.mean():.6f} +- {off.std():.2e}"
    if scores is not None:
        top = max(float(s.abs().max()) for s in scores)
        assert top > 1e-9, f"scores degenerate: largest {top:.2e}"
    if widths is not None and floor is not None:
        assert widths != floor, f"every block cut to the search's floor {floor}"


def read_search(out) -> dict:
    """An output folder's search.json, with its shapes (and the original's) also read out as lists of
    widths and head counts for the assertions (`heads` None where no heads were searched)."""
    from amp_deploy.prune.shape import from_record, heads_of, widths_of

    search = json.loads((Path(out) / "search.json").read_text())
    shapes, original = from_record(search), from_record(search, "original_")
    return {**search, "widths": widths_of(shapes), "heads": heads_of(shapes),
            "original_widths": widths_of(original), "original_heads": heads_of(original)}
