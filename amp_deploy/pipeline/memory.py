"""The build's memory plan from its recipe: the model's shape (built on the meta device, no weights
read), the recipe's batch sizes and settings, and the devices it runs on; refused before any work
where a stage does not fit (measure/memory_plan.py holds the arithmetic)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from amp_deploy.errors import UserError
from amp_deploy.measure.memory_plan import FIT_SHARE, ModelShape, StagePlan, gib, plan_stages, too_big
from amp_deploy.recipe import Recipe


def model_shape(recipe: Recipe) -> ModelShape:
    """The recipe's model, measured on the meta device (a 4B tower costs no memory)."""
    m = recipe.model
    return _shape(m.source, m.name, json.dumps(m.kwargs, sort_keys=True),
                  json.dumps(m.mlp_sites.model_dump() if m.mlp_sites else None),
                  m.pretrained if m.source == "checkpoint" else None)


@functools.lru_cache(maxsize=4)
def _shape(source: str, name: str | None, kwargs: str, sites: str, checkpoint: str | None) -> ModelShape:
    from amp_deploy.checkpoint import load_any

    if checkpoint is not None:  # a pruned checkpoint of ours: its own (small) weights
        return shape_of(load_any("checkpoint", None, checkpoint, {}))
    extra = {"device": "meta"} if source == "open_clip" else {}  # open_clip moves its model to a device itself
    with torch.device("meta"):
        loaded = load_any(source, name, False, {**json.loads(kwargs), **extra}, json.loads(sites))
    return shape_of(loaded)


def shape_of(loaded) -> ModelShape:
    """A built model's shape (`Loaded`, on any device, the meta device included)."""
    from amp_deploy.prune.families import count_params

    blocks = loaded.block_list()
    widths = loaded.widths()
    neuron = []
    for i, w in enumerate(widths):
        mlp = sum(t.numel() for mod in loaded.mlp_modules(i).values() for t in mod.parameters())
        neuron.append(mlp // max(1, w))
    c, h, w_ = loaded.input_size
    patch = _patch(loaded.model, (h, w_))
    tokens = patch + _extra_tokens(loaded.model)
    dim = loaded.mlp_modules(0)["fc_in"].in_features
    heads = max(loaded.heads() or [max(1, dim // 64)])  # a family whose heads are not found: 64 channels a head
    return ModelShape(params=count_params(loaded.model), dim=dim, widths=tuple(widths), neuron_params=tuple(neuron),
                      block_params=max(count_params(b) for b in blocks), tokens=tokens, image_values=c * h * w_,
                      heads=heads)


def _patch(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """Patches of an image: from the first convolution's stride (every supported family embeds
    patches with one)."""
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    sh, sw = conv.stride
    return (size[0] // sh) * (size[1] // sw)


def _extra_tokens(model: torch.nn.Module) -> int:
    """Class and register tokens the model prepends."""
    n = 0
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("cls_token", "class_embedding", "reg_token", "register_tokens") and "text" not in name:
            n += p.shape[-2] if p.dim() >= 2 and leaf != "class_embedding" else 1
    return n


def device_memory(device: str) -> int | None:
    """Bytes of one device here: the GPU's total memory, or the host's available memory (and what
    this process holds already)."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    free = proc_kib("/proc/meminfo", "MemAvailable")
    return None if free is None else (free << 10) + process_rss()


UNKNOWN_CAPACITY = ("the memory available on this machine is unknown (no /proc/meminfo: not Linux), so no stage is "
                    "refused for its size")


def device_capacity(device: str, sharing: int = 1) -> int | None:
    """Bytes one process may plan on: a GPU's memory, or the host's available memory shared by the
    `sharing` processes of this node (None when unknown). The memory plan and distill.sharding auto
    decide on the same figure."""
    total = device_memory(device)
    return None if total is None else total // (max(1, sharing) if device == "cpu" else 1)


def process_rss() -> int:
    """This process's resident memory (bytes; 0 where /proc is missing)."""
    return (proc_kib("/proc/self/status", "VmRSS") or 0) << 10


def proc_kib(path: str, field: str) -> int | None:
    """A kB figure of a /proc file (meminfo, status); None where it is missing (not Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def recipe_plan(recipe: Recipe, device: str, processes: int, widths: list[int] | None = None,
                capacity: int | None = None, baseline: int | None = None) -> list[StagePlan]:
    """Every stage's plan for this recipe on `processes` devices of type `device` (`capacity` bytes
    each: the sharding auto choice depends on it). `baseline`: what the process holds before a stage
    (default: this process now; a stage planned in a process of its own, before the model is loaded)."""
    from amp_deploy.prune.distill import plan_sharding

    shape = model_shape(recipe)
    d, v = recipe.distill, recipe.validate_
    distill = None
    if d.epochs:
        precision = distill_precision(d.precision, device)
        student = shape.params_at(widths) if widths else shape.params
        sharding = plan_sharding(d.sharding, processes, student=student, teacher=shape.params, precision=precision,
                                 capacity=capacity)["sharding"]
        distill = {"batch": min(d.batch_size, d.images or recipe.data.calibration), "sharding": sharding,
                   "checkpointing": d.checkpointing,
                   "bf16": precision == "bf16"}
    cpu_rows = [r for r in recipe.runtimes if r in ("onnxruntime", "openvino", "openvino-bf16")]
    compiles = "tensorrt" in recipe.runtimes
    baseline = process_rss() if baseline is None else baseline
    return plan_stages(shape, device=device, processes=processes, baseline=baseline, widths=widths,
                       score_batch=min(recipe.data.batch_size, recipe.data.calibration),  # no batch holds
                       checkpointing=recipe.prune.checkpointing,  # more images than there are
                       validation=recipe.data.validation, holdout=recipe.data.holdout,
                       search_batch=min(recipe.data.batch_size, recipe.data.validation), distill=distill,
                       workspace_mib=recipe.compile.workspace_mib if compiles else None,
                       validate_batch=max(v.batch_sizes), cpu_sessions=len(cpu_rows))


def distill_precision(setting: str, device: str) -> str:
    """distill.precision resolved: auto is bf16 on CUDA, fp32 on the CPU."""
    return setting if setting != "auto" else ("bf16" if device == "cuda" else "fp32")


def refuse_unfit(plans: list[StagePlan], capacity: dict[str, int], processes: int) -> None:
    """A UserError naming the stage, its peak, its largest term and what to change, where a stage does
    not fit its device."""
    bad = too_big(plans, capacity)
    if bad is None:
        return
    cap = capacity[bad.device]
    where = "the host" if bad.device == "cpu" else f"each of {processes} GPU{'s' if processes > 1 else ''}"
    largest = bad.largest()
    raise UserError(f"memory plan: stage '{bad.stage}' needs {gib(bad.peak)} on {where} ({gib(cap)}, of which "
                    f"{FIT_SHARE:.0%} is planned on; {largest} {gib(bad.terms[largest])}"
                    f"{', ' + bad.note if bad.note else ''}); change {bad.fix}")


def plan_rows(plans: list[StagePlan]) -> list[tuple[str, ...]]:
    """(stage, device, peak, its terms, note) for a table."""
    return [(p.stage, p.device, gib(p.peak), ", ".join(f"{k} {gib(v)}" for k, v in p.terms.items()), p.note)
            for p in plans]


def planned_peaks(plans: list[StagePlan]) -> dict[str, dict[str, Any]]:
    return {p.stage: p.as_dict() for p in plans}
