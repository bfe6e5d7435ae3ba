"""The recipe: a strict YAML document parsed into typed objects.

Only this module knows YAML. Every problem is collected and reported at once with its dotted
path; an unknown key is an error, and so is a wrong type (no silent coercion of "0.1" to 0.1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from amp_deploy.errors import UserError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a recipe name: names out/NAME and Triton entries
RuntimeName = Literal["onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "torch", "torch-compile"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MlpSitesSpec(_Strict):
    """Where the MLPs are in a model family amp-deploy does not know (module paths)."""

    blocks: str  # the block list, from the model: "encoder.layers"
    fc_in: str  # inside a block: "mlp.fc1" (d -> h, or d -> 2h when packed)
    fc_out: str  # inside a block: "mlp.fc2" (h -> d)
    packed: bool = False  # fc_in holds value and gate halves
    gate: str | None = None  # a separate gate Linear (d -> h)
    norm: str | None = None  # a LayerNorm over the h hidden neurons


class ModelSpec(_Strict):
    source: Literal["timm", "open_clip", "checkpoint"] = "timm"
    name: str | None = None
    pretrained: bool | str = False
    kwargs: dict[str, Any] = Field(default_factory=dict)
    mlp_sites: MlpSitesSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.source != "checkpoint" and not self.name:
            raise ValueError(f"model.name is required for source {self.source!r}")
        if self.source == "checkpoint" and not isinstance(self.pretrained, str):
            raise ValueError("source 'checkpoint' needs model.pretrained: the path of a pruned.safetensors")
        if isinstance(self.pretrained, str) and not Path(self.pretrained).is_file():
            raise ValueError(f"model.pretrained: weights file not found: {self.pretrained}")
        return self


class DataSpec(_Strict):
    source: Literal["digits", "folder", "synthetic"] = "digits"
    path: str | None = None
    calibration: int = Field(512, ge=1)
    validation: int = Field(256, ge=1)
    holdout: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.source == "folder":
            if not self.path:
                raise ValueError("data.path is required when data.source is 'folder'")
            if not Path(self.path).is_dir():
                raise ValueError(f"data.path: not a directory: {self.path}")
        return self


class PruneSpec(_Strict):
    criterion: Literal["entropy", "ce", "magnitude", "random"] = "entropy"
    search: Literal["adaptive", "uniform"] = "adaptive"
    threshold: float = Field(0.01, ge=0)
    keep_ratio: float | None = Field(None, gt=0, le=1)
    target_params: float | None = Field(None, gt=0, le=1)  # adaptive: a budget, as a fraction of params
    taylor: Literal["abs", "signed"] = "abs"  # rank neurons by mean |a*g| (the paper's default) or mean a*g
    temperature: float = Field(15.0, gt=0)
    steps: int = Field(6, ge=1, le=20)
    align: int = Field(1, ge=1)
    cache: bool = True  # reuse the hidden states entering each block during the search
    checkpointing: bool = False  # recompute activations while scoring, so that giant models fit

    @model_validator(mode="after")
    def _check(self) -> PruneSpec:
        if self.search == "uniform" and self.keep_ratio is None:
            raise ValueError("prune.keep_ratio is required when prune.search is 'uniform'")
        if self.search == "uniform" and self.target_params is not None:
            raise ValueError("prune.target_params works with prune.search 'adaptive' (it searches the threshold)")
        return self


class BatchRange(_Strict):
    min: int = Field(1, ge=1)
    opt: int = Field(8, ge=1)
    max: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check(self) -> BatchRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"export.batch needs min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class ExportSpec(_Strict):
    opset: int = Field(18, ge=17, le=23)  # >= 17: LayerNorm is one LayerNormalization node
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    batch: BatchRange = Field(default_factory=BatchRange)


class CompileSpec(_Strict):
    """TensorRT engine builds (and the precision of ONNX Runtime's TensorRT provider)."""

    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    strongly_typed: bool = True  # false: fp32 ONNX plus FP16/BF16 builder flags (TensorRT 10.x only)
    workspace_mib: int = Field(4096, ge=16)
    optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: bool = True  # kept in OUT/timing.cache and reused by later builds


class ParityGate(_Strict):
    max_abs_err: float = Field(1e-4, gt=0)
    cosine_min: float = Field(0.99999, ge=-1, le=1)


def _reduced_gate() -> ParityGate:
    return ParityGate(max_abs_err=5e-2, cosine_min=0.999)


class FidelityGate(_Strict):
    """Optional limits on the price of pruning (pruned vs original on the holdout images)."""

    cosine_mean: float | None = Field(None, ge=-1, le=1)  # at least
    top1_agreement: float | None = Field(None, ge=0, le=1)  # at least
    accuracy_drop: float | None = Field(None, ge=0)  # at most, in points


class ValidateSpec(_Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    warmup: int = Field(10, ge=0)
    warmup_seconds: float = Field(0.0, ge=0)
    iterations: int = Field(50, ge=1)
    threads: int | None = Field(None, ge=1)
    parity: ParityGate = Field(default_factory=ParityGate)  # fp32 runtimes
    parity_reduced: ParityGate = Field(default_factory=_reduced_gate)  # fp16 / bf16 runtimes
    fidelity: FidelityGate = Field(default_factory=FidelityGate)

    @model_validator(mode="after")
    def _check(self) -> ValidateSpec:
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError("validate.batch_sizes must all be >= 1")
        return self


class Recipe(_Strict):
    name: str = Field(pattern=f"^{NAME_PATTERN}$", max_length=100)  # names the default out/NAME
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    compile: CompileSpec = Field(default_factory=CompileSpec)
    runtimes: list[RuntimeName] = Field(default_factory=lambda: ["onnxruntime", "tensorrt"])
    validate_: ValidateSpec = Field(default_factory=ValidateSpec, alias="validate")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        over = [b for b in self.validate_.batch_sizes if b > self.export.batch.max]
        if over:
            raise ValueError(f"validate.batch_sizes {over} exceed export.batch.max {self.export.batch.max}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# Keys holding paths: relative paths are resolved against the recipe's folder (in the file) or
# the working directory (on the command line), so a build does not depend on where it runs.
_PATH_KEYS = (("model", "pretrained"), ("data", "path"))


def parse_override(item: str) -> tuple[list[str], Any]:
    """`prune.threshold=0.02` -> (["prune", "threshold"], 0.02); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. prune.threshold=0.02")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set(doc: dict, keys: list[str], value: Any) -> None:
    node = doc
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = node[k] = {}
        node = child
    node[keys[-1]] = value


def _resolve_paths(doc: dict, base: Path) -> None:
    for section, key in _PATH_KEYS:
        node = doc.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = str((base / Path(node[key]).expanduser()).resolve())


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give the recipe's YAML file")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        doc = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping, got {type(doc).__name__}")
    return doc


def format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join("validate" if p == "validate_" else str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        # Cross-field checks name their keys themselves.
        out.append(msg if not loc or msg.startswith(f"{loc}.") else f"{loc}: {msg}")
    return out


def recipe_problems(doc: dict) -> tuple[Recipe | None, list[str]]:
    """Validate a recipe document; return the recipe or every problem found."""
    try:
        return Recipe.model_validate(doc), []
    except ValidationError as e:
        return None, format_errors(e)


def recipe_document(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The recipe file as a dict, with paths resolved and command-line overrides applied."""
    path = Path(path)
    doc = read_yaml(path)
    _resolve_paths(doc, path.parent)
    for item in overrides:
        keys, value = parse_override(item)
        sub: dict = {}
        _set(sub, keys, value)
        _resolve_paths(sub, Path.cwd())
        _set(doc, keys, _get(sub, keys))
    return doc


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raise UserError naming every problem on one line."""
    recipe, problems = recipe_problems(recipe_document(path, overrides))
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return recipe


def _get(doc: dict, keys: list[str]) -> Any:
    for k in keys:
        doc = doc[k]
    return doc


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
