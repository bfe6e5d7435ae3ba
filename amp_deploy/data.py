"""Images for calibration (scores), validation (width search) and holdout (the report).

Images are PIL images passed through the model's own eval transform. The three sets never
overlap. For the bundled digits, calibration and validation come from the training split of the
embedded model and the holdout from its test split, so accuracy in the report is honest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from amp_deploy.errors import UserError

DIGITS_TOTAL = 1797  # images in sklearn's digits
DIGITS_TEST = 360  # images in its fixed test split
DataSource = Literal["digits", "folder", "synthetic"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Split:
    """One set of images (already transformed) and their labels, when the data has labels."""

    images: torch.Tensor
    labels: torch.Tensor | None

    def batches(self, batch_size: int):
        """(images, labels or None) in order, `batch_size` at a time."""
        for i in range(0, len(self.images), batch_size):
            labels = self.labels[i : i + batch_size] if self.labels is not None else None
            yield self.images[i : i + batch_size], labels


@dataclass
class Data:
    """Calibration (scores), validation (width search) and holdout (the report) images."""

    calibration: Split
    validation: Split
    holdout: Split
    skipped: int = 0  # unreadable files left out
    reserved: frozenset[Path] = frozenset()  # folder files of the validation and holdout sets: never trained on


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed train/test split of sklearn's digits: (train indices, test indices)."""
    perm = np.random.default_rng(0).permutation(DIGITS_TOTAL)
    return perm[DIGITS_TEST:], perm[:DIGITS_TEST]


def digits_images() -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    return [Image.fromarray(p, mode="L").convert("RGB") for p in pixels], d.target


def _to_split(images: list[Image.Image], labels: np.ndarray | None, transform: Callable) -> Split:
    x = torch.stack([transform(im) for im in images]) if images else torch.empty(0)
    return Split(x, torch.as_tensor(labels, dtype=torch.long) if labels is not None else None)


def _need(what: str, have: int, want: int, hint: str) -> None:
    if have < want:
        raise UserError(f"data: {what} has {have} images but the recipe asks for {want}; {hint}")


def load_digits_data(*, calibration: int, validation: int, holdout: int, seed: int, transform: Callable) -> Data:
    """Calibration and validation from the embedded model's training split, holdout from its test split."""
    images, labels = digits_images()
    train, test = digits_split()
    train = np.random.default_rng(seed).permutation(train)
    _need("digits training split", len(train), calibration + validation,
          "lower data.calibration + data.validation")
    _need("digits test split", len(test), holdout, f"lower data.holdout to at most {len(test)}")
    parts = [train[:calibration], train[calibration : calibration + validation], test[:holdout]]
    return Data(*[_to_split([images[i] for i in idx], labels[idx], transform) for idx in parts])


def _open_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, as the model transforms expect (16-bit scaled, alpha on black)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(arr.max(), 1.0)
        im = Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def image_files(root: Path, key: str = "data.path") -> list[Path]:
    """Image files under `root`, sorted; a UserError (naming the recipe `key`) when there are none."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{key}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files


def load_folder_data(path: str, *, calibration: int, validation: int, holdout: int, seed: int,
                     transform: Callable) -> Data:
    """Images under `path` in a seeded order; unreadable files are skipped and counted."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"data.path: not a directory: {root}")
    files = image_files(root)
    files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    want = calibration + validation + holdout
    images, used, skipped = _read_images(files, want)
    _need(f"data.path {root} ({skipped} unreadable skipped)", len(images), want,
          "add images or lower data.calibration / validation / holdout")
    cuts = [images[:calibration], images[calibration : calibration + validation], images[calibration + validation :]]
    reserved = frozenset(p.resolve() for p in used[calibration:])
    return Data(*[_to_split(c, None, transform) for c in cuts], skipped=skipped, reserved=reserved)


def _read_images(files: list[Path], limit: int | None = None) -> tuple[list[Image.Image], list[Path], int]:
    """Open files in order until `limit` images are read: (images, their files, unreadable skipped)."""
    images, used, skipped = [], [], 0
    for f in files:
        if limit is not None and len(images) == limit:
            break
        im = _open_image(f)
        if im is None:
            skipped += 1
        else:
            images.append(im)
            used.append(f)
    return images, used, skipped


def distill_split(source: DataSource, data: Data, *, distill_path: str | None, validation: int, seed: int,
                  transform: Callable) -> Split:
    """Images to distil on: never the holdout, never the validation images.

    digits: the training split minus the validation images; folder: `distill_path`'s images minus
    any of the validation and holdout files, or else the calibration images; synthetic: the
    calibration images.
    """
    if source == "digits":
        images, labels = digits_images()
        train = np.random.default_rng(seed).permutation(digits_split()[0])
        calibration = len(data.calibration.images)
        keep = np.concatenate([train[:calibration], train[calibration + validation:]])
        split = _to_split([images[i] for i in keep], labels[keep], transform)
    elif source == "folder" and distill_path:
        files = [f for f in image_files(Path(distill_path), key="distill.path") if f.resolve() not in data.reserved]
        split = _to_split(_read_images(files)[0], None, transform)
    else:
        split = data.calibration
    if len(split.images) == 0:
        raise UserError("distill: no images are left to train on once the holdout and validation images are "
                        "excluded; give distill.path a folder of other images")
    return split


def load_synthetic_data(*, calibration: int, validation: int, holdout: int, seed: int,
                        transform: Callable, size: tuple[int, int]) -> Data:
    """Seeded random images: for smoke tests and speed, never for judging accuracy."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> Split:
        arr = rng.integers(0, 256, size=(n, size[0], size[1], 3), dtype=np.uint8)
        return _to_split([Image.fromarray(a) for a in arr], None, transform)

    return Data(make(calibration), make(validation), make(holdout))


def load_data(source: DataSource, path: str | None, *, calibration: int, validation: int, holdout: int, seed: int,
              transform: Callable, input_size: tuple[int, int, int]) -> Data:
    """The three disjoint image sets of a recipe's data section, through `transform`."""
    sets = dict(calibration=calibration, validation=validation, holdout=holdout, seed=seed)
    if source == "digits":
        return load_digits_data(**sets, transform=transform)
    if source == "folder":
        return load_folder_data(path or "", **sets, transform=transform)
    return load_synthetic_data(**sets, transform=transform, size=input_size[1:])
