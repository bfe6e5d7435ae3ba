"""Checks that need more than the recipe schema, run before anything is written."""

from __future__ import annotations

from pathlib import Path

from amp_deploy.errors import UserError
from amp_deploy.recipe import Recipe


def prepare_out(out: Path) -> None:
    """Create the output folder; a UserError when it cannot be one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None


def preflight(recipe: Recipe) -> None:
    """Cheap checks that need more than the recipe schema, run before anything is written."""
    m = recipe.model
    if m.source == "timm":
        import timm

        if not timm.is_model(m.name):
            from amp_deploy.prune.families import unknown_model_error

            raise unknown_model_error(m.name, timm.list_models(), "timm")
    elif m.source == "checkpoint":
        from amp_deploy.checkpoint import read_metadata

        read_metadata(m.pretrained)
    if isinstance(m.pretrained, str) and m.pretrained.endswith(".safetensors") and m.source != "checkpoint":
        from amp_deploy.prune.families import safetensors_metadata

        safetensors_metadata(m.pretrained)
    d = recipe.data
    if d.source == "digits":
        from amp_deploy.data import DIGITS_TEST, DIGITS_TOTAL

        if d.holdout > DIGITS_TEST:
            raise UserError(f"data.holdout: the digits test split has {DIGITS_TEST} images, the recipe asks for {d.holdout}")
        if d.calibration + d.validation > DIGITS_TOTAL - DIGITS_TEST:
            raise UserError(f"data: the digits training split has {DIGITS_TOTAL - DIGITS_TEST} images, the recipe asks for "
                            f"{d.calibration + d.validation} (data.calibration + data.validation)")
    if d.source == "folder":
        from amp_deploy.data import image_files

        have, want = len(image_files(Path(d.path))), d.calibration + d.validation + d.holdout
        if have < want:
            raise UserError(f"data.path: {d.path} has {have} image files but the recipe asks for {want} "
                            "(data.calibration + validation + holdout)")
