"""Images for calibration (scores), validation (width search) and holdout (the report).

Images are PIL images passed through the model's own eval transform. The three sets never
overlap. For the bundled digits, calibration and validation come from the training split of the
embedded model and the holdout from its test split, so accuracy in the report is honest.
"""

from __future__ import annotations

import re
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
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """(images, labels or None) in order, `batch_size` at a time (across processes: every
        world-th batch, starting at rank)."""
        for j, i in enumerate(range(0, len(self.images), batch_size)):
            if j % world == rank:
                labels = self.labels[i : i + batch_size] if self.labels is not None else None
                yield self.images[i : i + batch_size], labels


class _Items(torch.utils.data.Dataset):
    """Item i: (transformed image, label) or None when it cannot be read or transformed."""

    def __init__(self, load: Callable[[int], Image.Image | None], labels: torch.Tensor | None, transform: Callable,
                 n: int) -> None:
        self.load, self.labels, self.transform, self.n = load, labels, transform, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        try:
            im = self.load(i)
            x = None if im is None else self.transform(im)
        except Exception:  # noqa: BLE001 - a file that breaks the reader or the transform is skipped, and counted
            x = None
        return None if x is None else (x, -1 if self.labels is None else int(self.labels[i]))


def _collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    kept = [it for it in items if it is not None]
    x = torch.stack([k[0] for k in kept]) if kept else None
    return x, torch.as_tensor([k[1] for k in kept], dtype=torch.long), len(items) - len(kept)


class Stream:
    """Images read and transformed batch by batch, in DataLoader worker processes: a set of any size
    is never held in memory at once. Unreadable images are skipped and counted in `skipped`."""

    def __init__(self, load: Callable[[int], Image.Image | None], n: int, labels: torch.Tensor | None,
                 transform: Callable, workers: int = 0) -> None:
        self.items = _Items(load, labels, transform, n)
        self.labels, self.workers, self.skipped = labels, workers, 0

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """As `Split.batches`; the skipped count grows as batches are read."""
        chunks = [list(range(i, min(i + batch_size, len(self.items)))) for i in range(0, len(self.items), batch_size)]
        loader = torch.utils.data.DataLoader(self.items, batch_sampler=chunks[rank::world], collate_fn=_collate,
                                             num_workers=self.workers, persistent_workers=False)
        self.skipped = 0
        for x, labels, skipped in loader:
            self.skipped += skipped
            if x is not None:
                yield x, (labels if self.labels is not None else None)

    def read(self, chunks: list[list[int]]):
        """(chunk index, images) for each chunk of item indices, read by the workers in that order;
        unreadable images are left out and counted in `skipped` (a chunk with none readable is
        not yielded)."""
        loader = torch.utils.data.DataLoader(self.items, batch_sampler=chunks, collate_fn=_collate,
                                             num_workers=self.workers, persistent_workers=False)
        for i, (x, _, skipped) in enumerate(loader):
            self.skipped += skipped
            if x is not None:
                yield i, x


Images = Split | Stream  # what `batches()` can be asked of


@dataclass
class Data:
    """Calibration (scores), validation (width search) and holdout (the report) images."""

    calibration: Split | Stream
    validation: Split
    holdout: Split
    skipped: int = 0  # unreadable files left out of validation and holdout (the calibration stream counts its own)
    reserved: frozenset[Path] = frozenset()  # folder files of the validation and holdout sets: never trained on
    classes: list[str] | None = None  # class folder names (ImageNet-style folder), index = label
    holdout_files: list[Path] | None = None  # a folder's holdout images, in the holdout's order
    names_file: str | None = None  # data.class_names: readable class names, one per line, in class order

    def class_names(self) -> list[str]:
        """Readable class names for text prompts (zero-shot, the image-text view); a UserError when
        there are none: no class folders, or WordNet ids with no known name and no data.class_names."""
        if not self.classes:
            raise UserError("class names: the data has no class folders (data.source: folder with one subfolder "
                            "per class)")
        return readable_class_names(self.classes, self.names_file)


WNID = re.compile(r"n\d{8}")


def readable_class_names(folders: list[str], names_file: str | None = None) -> list[str]:
    """Class folder names as text prompts take them: a user's file (one name per line, in the sorted
    folder order), else WordNet ids (n01440764) through the package's ImageNet table (CLIP's curated
    names) or timm's synset lemmas, else the folder names with _ and - as spaces."""
    if names_file:
        names = [ln.strip() for ln in Path(names_file).read_text(errors="replace").splitlines() if ln.strip()]
        if len(names) != len(folders):
            raise UserError(f"data.class_names: {names_file} has {len(names)} names for {len(folders)} class folders")
        return names
    table = _wordnet_names() if any(WNID.fullmatch(f) for f in folders) else {}
    unknown = [f for f in folders if WNID.fullmatch(f) and f not in table]
    if unknown:
        raise UserError(f"class names: no readable name for the WordNet ids {', '.join(unknown[:3])}"
                        f"{' ...' if len(unknown) > 3 else ''}; give data.class_names a file with one name per class")
    return [table.get(f) or f.replace("_", " ").replace("-", " ") for f in folders]


def _wordnet_names() -> dict[str, str]:
    """WordNet id -> name: ImageNet-1k from the package's table, other synsets from timm's lemmas."""
    import timm

    table = {}
    lemmas = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    if lemmas.is_file():
        for line in lemmas.read_text().splitlines():
            wnid, _, lemma = line.partition("\t")
            table[wnid] = lemma.split(",")[0].strip()
    for line in (Path(__file__).parent / "assets" / "imagenet_classnames.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            wnid, name = line.split("\t")
            table[wnid] = name
    return table


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


class FileImages:
    """Image i of a list of files, or None when it cannot be read (picklable: DataLoader workers
    under the spawn and forkserver start methods get a copy)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __call__(self, i: int) -> Image.Image | None:
        return _open_image(self.files[i])


class SyntheticImages:
    """Seeded random image i (picklable, like FileImages)."""

    def __init__(self, seed: int, offset: int, size: tuple[int, int]) -> None:
        self.seed, self.offset, self.size = seed, offset, size

    def __call__(self, i: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, self.offset + i])
        return Image.fromarray(rng.integers(0, 256, size=(self.size[0], self.size[1], 3), dtype=np.uint8))


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
    files = _walk_images(root)
    if not files:
        raise UserError(f"{key}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files


def _walk_images(root: Path) -> list[Path]:
    """Image files under `root`, sorted, following symlinked folders as torchvision's ImageFolder does
    (os.walk with followlinks; a link loop is walked once)."""
    import os

    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


def folder_layout(root: Path) -> tuple[list[Path], torch.Tensor | None, list[str] | None]:
    """Files, labels and class names of an image folder.

    A folder whose images all sit in subfolders is ImageNet-style: one class per subfolder, the class
    index its position among the sorted subfolder names (as torchvision's ImageFolder). A folder
    with images at its top level is flat: no labels.
    """
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    top = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if top or not subdirs:
        return image_files(root), None, None
    files, labels = [], []
    for k, d in enumerate(subdirs):
        found = _walk_images(d)
        if not found:
            raise UserError(f"data.path: class folder {d.name!r} holds no image files ({root})")
        files += found
        labels += [k] * len(found)
    return files, torch.as_tensor(labels, dtype=torch.long), [d.name for d in subdirs]


def folder_order(root: Path, seed: int) -> tuple[list[Path], torch.Tensor | None, list[str] | None]:
    """`folder_layout` in the seeded order the sets are cut from: calibration first, then validation
    and holdout (also what the preflight uses to know which files those two will take)."""
    files, labels, classes = folder_layout(root)
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order], (labels[torch.as_tensor(order)] if labels is not None else None), classes


def load_folder_data(path: str, *, calibration: int, validation: int, holdout: int, seed: int,
                     transform: Callable, workers: int = 0) -> Data:
    """Images under `path` in a seeded order: calibration streamed, validation and holdout read
    (skipping and counting unreadable files) until each is full."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"data.path: not a directory: {root}")
    files, labels, classes = folder_order(root, seed)
    _need(f"data.path {root}", len(files), calibration + validation + holdout,
          "add images or lower data.calibration / validation / holdout")
    cal = Stream(FileImages(files), calibration, labels[:calibration] if labels is not None else None,
                 transform, workers)
    images, used, skipped = _read_images(files[calibration:], validation + holdout)
    _need(f"data.path {root} ({skipped} unreadable skipped)", calibration + len(images),
          calibration + validation + holdout, "add images or lower data.calibration / validation / holdout")
    index = {f: calibration + i for i, f in enumerate(files[calibration:])}
    picked = [index[f] for f in used]
    lab = [labels[picked[:validation]], labels[picked[validation:]]] if labels is not None else [None, None]
    val = _to_split(images[:validation], lab[0], transform)
    hold = _to_split(images[validation:], lab[1], transform)
    reserved = frozenset(p.resolve() for p in used)
    return Data(cal, val, hold, skipped=skipped, reserved=reserved, classes=classes, holdout_files=used[validation:])


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
                  transform: Callable, workers: int = 0, limit: int | None = None) -> Split | Stream:
    """Images to distil on: never the holdout, never the validation images.

    digits: the training split minus the validation images (in memory: 1,437 8x8 images);
    folder: `distill_path`'s images minus any of the validation and holdout files (`limit` of them, a
    seeded sample, when given), or else the calibration images, streamed from disk batch by batch
    (memory does not grow with the folder);
    synthetic: the calibration images (a stream too).
    """
    if source == "digits":
        images, labels = digits_images()
        train = np.random.default_rng(seed).permutation(digits_split()[0])
        calibration = len(data.calibration.images)
        keep = np.concatenate([train[:calibration], train[calibration + validation:]])
        split: Split | Stream = _to_split([images[i] for i in keep], labels[keep], transform)
    elif source == "folder" and distill_path:
        files = [f for f in image_files(Path(distill_path), key="distill.path") if f.resolve() not in data.reserved]
        if limit is not None and limit < len(files):
            files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), limit, replace=False))]
        split = Stream(FileImages(files), len(files), None, transform, workers)
    else:
        split = data.calibration
    if len(split) == 0:
        raise UserError("distill: no images are left to train on once the holdout and validation images are "
                        "excluded; give distill.path a folder of other images")
    return split


def load_synthetic_data(*, calibration: int, validation: int, holdout: int, seed: int,
                        transform: Callable, size: tuple[int, int], workers: int = 0) -> Data:
    """Seeded random images: for smoke tests and speed, never for judging accuracy. Calibration
    images are made as they are read (a stream), validation and holdout at once."""

    def split(offset: int, n: int) -> Split:
        return _to_split([SyntheticImages(seed, offset, size)(i) for i in range(n)], None, transform)

    cal = Stream(SyntheticImages(seed, 0, size), calibration, None, transform, workers)
    return Data(cal, split(calibration, validation), split(calibration + validation, holdout))


def load_data(source: DataSource, path: str | None, *, calibration: int, validation: int, holdout: int, seed: int,
              transform: Callable, input_size: tuple[int, int, int], workers: int = 0) -> Data:
    """The three disjoint image sets of a recipe's data section, through `transform`."""
    sets = dict(calibration=calibration, validation=validation, holdout=holdout, seed=seed)
    if source == "digits":
        return load_digits_data(**sets, transform=transform)
    if source == "folder":
        return load_folder_data(path or "", **sets, transform=transform, workers=workers)
    return load_synthetic_data(**sets, transform=transform, size=input_size[1:], workers=workers)


def default_workers() -> int:
    """DataLoader workers when the recipe names none: one per spare core, at most 8."""
    import os

    return max(0, min(8, (os.cpu_count() or 1) - 1))
