"""The memory each stage of a build will need, per device, worked out before any work.

A plan is arithmetic on the model's shape (parameters, blocks, widths, heads, tokens), the batch
sizes, the precision, activation checkpointing, sharding and the number of processes: no model is
run. Each stage's peak is a sum of named terms, so a plan that does not fit says which term is the
problem and which recipe key changes it.

What the terms count (bytes; `e` is 2 under bf16, 4 in fp32):
- weights: 4 bytes a parameter of each fp32 model the stage holds (the build keeps the original
  loaded across stages and works on a copy of it).
- training activations, per image and block: what autograd keeps for the backward pass of a
  pre-norm transformer block with fused attention (scaled_dot_product_attention keeps its output
  and log-sum-exp, not the N x N scores): about ACT_DIM_FACTOR x N x D values in the attention half
  and the norms, and 2 x N x H in the MLP (its two matrix products' inputs); the score stage's
  Taylor hooks keep a third N x H. With checkpointing, each block's input and one block's whole set
  at a time. Plus the gradient of one block's activations in flight.
- the search's cache: the input of every block for every validation image (L x V x N x D x 4: the search
  evaluates in fp32),
  on the GPU up to CACHE_ON_DEVICE_BYTES, beyond that in host memory.
- distillation: the student's fp32 weights, gradients and AdamW's two moments (16 bytes a
  parameter; sharded: 1/P of them, plus the largest block gathered in bf16 or fp32), the teacher
  (4 bytes a parameter, 2 in bf16; sharded: 1/P plus one gathered block).
- export: the exporter holds the model's weights once more while it writes the file
  (EXPORT_COPIES copies for the two models it writes, one after the other).
- compile (TensorRT, GPU only): the fp16 weights twice (the network and the engine being built)
  and the builder's workspace (`compile.workspace_mib`).
- validate: the original and the pruned model, the holdout images, a forward pass at the largest
  batch, and on the CPU each runtime's session of each model (one model's weights each).
- on the CPU, the process itself (Python, torch and the runtimes' libraries): `baseline`, measured
  in the planning process; on a GPU, CUDA_CONTEXT_BYTES for the context and the allocator's slack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amp_deploy.prune.search import CACHE_ON_DEVICE_BYTES  # noqa: F401 - the search's own figure, one constant

ACT_DIM_FACTOR = 10  # values of N x D that one block keeps for its backward, besides the MLP's N x H
EXPORT_COPIES = 4  # copies of the original's weights while it is exported: the exported program's, the optimised
# ONNX graph's, the serialised file's, and onnx.checker's full check, which loads the file again
EXPORTER_BYTES = 128 << 20  # the exporter's own working set (tracing, decompositions, the ONNX IR)
CUDA_CONTEXT_BYTES = 1 << 30  # the CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack
FIT_SHARE = 0.9  # a plan fits a device when its peak takes at most this share of the device's memory


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs to know of a model; `ModelShape.of(loaded)` reads it off a built model
    (on the meta device, no weights needed)."""

    params: int  # every parameter of the model (the pruned ones included)
    dim: int  # the residual stream's width
    widths: tuple[int, ...]  # MLP hidden width per block, as loaded
    neuron_params: tuple[int, ...]  # parameters one MLP neuron of each block takes (rows and columns)
    block_params: int  # the largest block's parameters (one FSDP unit)
    tokens: int  # sequence length at the model's input size
    image_values: int  # 3 x H x W
    heads: int = 1  # attention heads of the widest block

    @property
    def blocks(self) -> int:
        return len(self.widths)

    def params_at(self, widths: list[int] | tuple[int, ...]) -> int:
        """Parameters with these MLP widths (heads, where cut, are not counted off: an upper bound)."""
        return self.params - sum((w0 - w) * n for w0, w, n in zip(self.widths, widths, self.neuron_params))


@dataclass
class StagePlan:
    """One stage's expected peak on one device: named terms, their sum, and what to change."""

    stage: str
    device: str  # "cpu" (the host) or "cuda" (each GPU)
    terms: dict[str, int] = field(default_factory=dict)
    fix: str = ""  # the recipe keys or options that lower this stage's peak the most
    note: str = ""  # how it was planned (sharding chosen, not run here, ...)

    @property
    def peak(self) -> int:
        return sum(self.terms.values())

    def largest(self) -> str:
        return max(self.terms, key=self.terms.get) if self.terms else ""

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "device": self.device, "peak_bytes": self.peak, "terms": dict(self.terms),
                "fix": self.fix, "note": self.note}


def block_activations(shape: ModelShape, widths, batch: int, e: int, *, checkpointing: bool,
                      hooks: bool = False) -> int:
    """Bytes autograd keeps for a backward pass through every block, with one block's gradient in
    flight; `hooks`: the score stage's Taylor hooks keep each MLP's activation once more."""
    n, d = shape.tokens, shape.dim
    per = [n * (ACT_DIM_FACTOR * d + (3 if hooks else 2) * w) * e for w in widths]
    kept = len(widths) * n * d * e + max(per) if checkpointing else sum(per)
    return batch * (kept + max(per) + shape.image_values * 4)


def forward_activations(shape: ModelShape, widths, batch: int, e: int) -> int:
    """Bytes of a torch forward pass without gradients: the live residual stream, one block's
    attention projections and its MLP hidden activation, and the input images."""
    n, d = shape.tokens, shape.dim
    return batch * (n * (6 * d + max(widths)) * e + shape.image_values * 4)


def session_bytes(shape: ModelShape, widths, batch: int) -> int:
    """An ONNX Runtime CPU session of one model run at `batch`: its weights twice (the loaded graph's
    initializers and the kernels' pre-packed copies) and its arena, which grows to hold a forward's
    intermediates of every block (q, k, v and the projection's input, the MLP's hidden activation,
    the attention scores, unfused), fp32."""
    n, d = shape.tokens, shape.dim
    arena = batch * sum(n * (4 * d + w + shape.heads * n) * 4 for w in widths)
    return 2 * 4 * shape.params_at(widths) + arena


def plan_stages(shape: ModelShape, *, device: str, processes: int, baseline: int, widths=None,
                score_batch: int, checkpointing: bool, validation: int, holdout: int, search_batch: int,
                distill: dict[str, Any] | None, workspace_mib: int | None, validate_batch: int,
                cpu_sessions: int) -> list[StagePlan]:
    """Every stage's peak per device, for a stage run in a process of its own.

    Args:
        shape: the original model.
        device: "cpu" or "cuda"; processes: ranks (--nproc).
        baseline: bytes the process holds before a stage starts (CPU: Python, torch, the runtimes).
        widths: the pruned MLP widths where known (None: before the search, the original's, an upper bound).
        score_batch: images per rank in a scoring step; checkpointing: prune.checkpointing.
        validation, holdout: images held in memory (the search's and the report's sets).
        search_batch: images per evaluation batch of the search.
        distill: None (off) or {batch, sharding ("none"/"fsdp"), checkpointing, bf16}: batch is global.
        workspace_mib: TensorRT's workspace (None: nothing is compiled).
        validate_batch: the largest validation batch; cpu_sessions: ONNX Runtime/OpenVINO rows whose
            sessions (original and pruned) the build's process opens.
    """
    cuda = device == "cuda"
    widths = tuple(widths or shape.widths)
    w0, w1 = 4 * shape.params, 4 * shape.params_at(widths)
    # on the CPU the build's process holds the original as loaded and the copy a stage works on; on a
    # GPU only the copy is on the device
    base = {"runtime": CUDA_CONTEXT_BYTES, "original": w0} if cuda else {
        "runtime": baseline, "original (loaded, and its copy)": 2 * w0}
    held = {} if cuda else {"images": 4 * shape.image_values * (validation + holdout)}
    e = 2 if cuda else 4  # bf16 autocast on CUDA
    plans = [StagePlan("score", device, {**base, **held, "activations": block_activations(
        shape, shape.widths, score_batch, e, checkpointing=checkpointing, hooks=True)},
        fix="prune.checkpointing: true, data.batch_size" + (", or more processes (--nproc)" if cuda else ""))]
    cache = shape.blocks * validation * shape.tokens * shape.dim * 4  # the search evaluates in fp32, CUDA too
    on_device = min(cache, CACHE_ON_DEVICE_BYTES) if cuda else cache
    plans.append(StagePlan("search", device, {**base, **held, "cached block inputs": on_device,
                                              "activations": forward_activations(shape, shape.widths, search_batch, 4)},
                           fix="data.validation (the cache holds every block's input for each validation image), "
                               "data.batch_size",
                           note=f"host: {gib(cache - on_device)} of cached inputs" if cache > on_device else ""))
    if distill:
        plans.append(_distill_plan(shape, widths, device, processes, base, held, distill))
    plans.append(StagePlan("export", "cpu", {"runtime": baseline, "original (loaded, and its copy)": 2 * w0,
                                             "pruned": w1, "exporter": EXPORT_COPIES * w0 + EXPORTER_BYTES},
                           fix="export runs on the host: a machine with more host memory", note="on the host"))
    if workspace_mib is not None:
        plans.append(StagePlan("compile", "cuda", {"runtime": CUDA_CONTEXT_BYTES, "fp16 network and engine": w1,
                                                   "workspace": workspace_mib << 20},
                               fix="compile.workspace_mib", note="" if cuda else "not run here: TensorRT needs a GPU"))
    pruned = {"pruned" + (" (and before distillation)" if distill else ""): w1 * (2 if distill else 1)}
    rows = {} if cuda or not cpu_sessions else {"runtime sessions": cpu_sessions * (
        session_bytes(shape, shape.widths, validate_batch) + session_bytes(shape, widths, validate_batch))}
    plans.append(StagePlan("validate", device, {**base, **pruned, **({} if cuda else {
        "images": 4 * shape.image_values * holdout}), **rows,
        "activations": forward_activations(shape, shape.widths, max(validate_batch, search_batch), 4)},
        fix="validate.batch_sizes (the largest), fewer runtimes"))
    return plans


def _distill_plan(shape: ModelShape, widths, device: str, processes: int, base: dict, data: dict,
                  d: dict[str, Any]) -> StagePlan:
    """Distillation: student with gradients and AdamW state, teacher, activations; sharded or not."""
    p = max(1, processes)
    student, teacher = shape.params_at(widths), shape.params
    sharded = d["sharding"] == "fsdp"
    e = 2 if d["bf16"] else 4
    unit = shape.block_params * e  # one block's weights gathered for its forward or backward
    terms = {"runtime": base["runtime"], **({} if device == "cuda" else {"original (loaded)": 4 * teacher}), **data}
    if sharded:
        terms["student, gradients, AdamW"] = -(-16 * student // p) + 2 * unit
        terms["teacher"] = -(-e * teacher // p) + unit
    else:
        terms["student, gradients, AdamW"] = 16 * student
        terms["teacher"] = e * teacher
    terms["activations"] = block_activations(shape, widths, -(-d["batch"] // p), e, checkpointing=d["checkpointing"])
    terms = {k: v for k, v in terms.items() if v}
    how = f"sharded over {p} process{'es' if p > 1 else ''} (FSDP2)" if sharded else "unsharded"
    more = "distill.sharding: fsdp with more processes (--nproc), " if device == "cuda" else ""
    return StagePlan("distill", device, terms, note=how,  # on the CPU, processes share the host's memory
                     fix=f"{more}distill.checkpointing: true, distill.batch_size")


def too_big(plans: list[StagePlan], capacity: dict[str, int]) -> StagePlan | None:
    """The first stage whose peak does not fit its device (`capacity`: bytes per device type)."""
    for plan in plans:
        cap = capacity.get(plan.device)
        if cap and not plan.note.startswith("not run") and plan.peak > FIT_SHARE * cap:
            return plan
    return None


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"
