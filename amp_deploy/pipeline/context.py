"""What the stages of one build share: the recipe, the folder, the device, a reporter, loaded things."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from amp_deploy.checkpoint import load_any
from amp_deploy.data import Data, Split, Stream, default_workers, load_data
from amp_deploy.errors import UserError
from amp_deploy.pipeline.folder import BuildFolder
from amp_deploy.prune.families import Loaded
from amp_deploy.recipe import Recipe


class Reporter(Protocol):
    """Progress and log lines, plain text: the CLI decides how they look."""

    def log(self, message: str) -> None:
        """A line the user should read (a stage finished, a resume)."""

    def note(self, message: str) -> None:
        """A secondary line (a stage skipped, a stray file removed)."""

    def task(self, description: str, total: int | None) -> Callable[..., None]:
        """Start a progress task; returns `advance(n=1, description=None)` (a new description: live figures)."""

    def clear_tasks(self) -> None:
        """Remove finished tasks (a stage's bars give way to its one-line summary)."""


class Quiet:
    """A Reporter that says nothing (torchrun workers, Python callers, tests)."""

    def log(self, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def task(self, description: str, total: int | None) -> Callable[..., None]:
        return lambda n=1, description=None: None

    def clear_tasks(self) -> None:
        pass


@dataclass(frozen=True)
class Stage:
    """One row of the stage table: what a stage depends on, what it writes, and what runs it.

    `run(ctx)` returns None when the stage is done, or a reason when it finished without a result
    worth keeping (a failed engine build): then it is not recorded, and the next build tries again.
    """

    name: str
    # dotted recipe sections, or (name, value) pairs of values computed from the recipe (the set of
    # runtimes, whether engines are built), beyond the key of the stage before (a function of the
    # recipe: some settings matter for some recipes only)
    depends: tuple | Callable[[Recipe], tuple]
    outputs: Callable[[BuildFolder], list[Path]]  # a stage whose outputs are missing or changed is redone
    run: Callable[[Context], str | None]
    machine_bound: bool | Callable[[Recipe], bool] = False  # engines and measurements belong to the machine they
    # were made on (a function of the recipe: bound for some recipes only)
    parallel: bool | Callable[[Recipe], bool] = False  # runs in --nproc processes under torchrun (data
    # parallel; a function of the recipe: parallel for some recipes only)
    reads: tuple[str, ...] = ()  # dotted recipe keys naming files or folders whose contents are inputs
    device_bound: bool = False  # its result depends on --device (cpu or cuda)


def runs_openvino(recipe: Recipe) -> bool:
    """The recipe has an OpenVINO row (a latency budget on OpenVINO must have one too): its IR is exported."""
    from amp_deploy.deploy.runtimes import OPENVINO_RUNTIMES

    return bool(set(OPENVINO_RUNTIMES) & set(recipe.runtimes))


def resolve_device(name: str) -> torch.device:
    """auto, cpu or cuda -> a torch device; a UserError when cuda is asked for and missing."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class Context:
    """One build in one process. The original model and the data are loaded once, on first use."""

    recipe: Recipe
    folder: BuildFolder
    device: torch.device
    reporter: Reporter = field(default_factory=Quiet)
    nproc: int = 1  # processes for the score stage (torchrun)
    plan_baseline: int | None = None  # the memory plan's process baseline (bytes), taken before any model loads
    _original: Loaded | None = field(default=None, repr=False)
    _data: Data | None = field(default=None, repr=False)

    @classmethod
    def create(cls, recipe: Recipe, out: str | Path, device: torch.device | str = "cpu", **kw) -> Context:
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        folder = BuildFolder(Path(out), distilled=recipe.distill.epochs > 0, openvino=runs_openvino(recipe))
        return cls(recipe, folder, dev, **kw)

    def original(self) -> Loaded:
        """A fresh copy of the original model on the build's device (stages prune their copy in place)."""
        if self._original is None:
            m = self.recipe.model
            sites = m.mlp_sites.model_dump() if m.mlp_sites else None
            # A random-init model (pretrained: false) must be the same model in every stage, every
            # resumed build and every rank: seed its initialisation.
            torch.manual_seed(self.recipe.data.seed)
            self._original = load_any(m.source, m.name, m.pretrained, m.kwargs, sites)
        loaded = copy.deepcopy(self._original)
        loaded.model.to(self.device)
        return loaded

    def distill_images(self) -> Split | Stream:
        """The images distillation trains on (never holdout or validation images)."""
        from amp_deploy.data import distill_split

        d = self.recipe
        return distill_split(d.data.source, self.data(), distill_path=d.distill.path, validation=d.data.validation,
                             seed=d.data.seed, transform=(self._original or self.original()).transform,
                             workers=self.workers(), limit=d.distill.images)

    def workers(self) -> int:
        w = self.recipe.data.workers
        return default_workers() if w is None else w

    def data(self) -> Data:
        """Calibration, validation and holdout images, through the model's own eval transform."""
        if self._data is None:
            d = self.recipe.data
            base = self._original or self.original()
            self._data = load_data(d.source, d.path, calibration=d.calibration, validation=d.validation,
                                   holdout=d.holdout, seed=d.seed, transform=base.transform,
                                   input_size=base.input_size,
                                   workers=self.workers())
            self._data.names_file = d.class_names
        return self._data


def compile_settings(ctx: Context, input_size: tuple[int, int, int]):
    """TensorRT build settings from the recipe's compile and export sections."""
    from amp_deploy.deploy.tensorrt_engine import BuildSettings

    c, b = ctx.recipe.compile, ctx.recipe.export.batch
    return BuildSettings(c.precision, b.min, b.opt, b.max, tuple(input_size), workspace_mib=c.workspace_mib,
                         optimization_level=c.optimization_level, strongly_typed=c.strongly_typed)
