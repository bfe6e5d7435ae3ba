"""Shared fixtures: tiny models from the real factories, fixed seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _has_trt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


requires_trt = pytest.mark.skipif(not _has_trt(), reason="needs the tensorrt package and a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_vit():
    """timm's own test ViT, shrunk: 3 blocks, 32x32 images, 10 classes."""
    from amp_deploy.families import load_timm

    return load_timm("test_vit", False, {"depth": 3, "img_size": 32, "num_classes": 10})


@pytest.fixture
def digits_model():
    from amp_deploy import digits
    from amp_deploy.families import load_timm

    return load_timm(digits.MODEL_NAME, str(digits.ASSET), digits.MODEL_KWARGS)
