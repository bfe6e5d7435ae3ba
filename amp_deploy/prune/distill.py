"""Recovery (AMP, step 5): distil the pruned model (student) from the original (teacher).

The student learns to reproduce the teacher's outputs on unlabeled images: KL divergence of the
temperature-softened logits for classifiers, cosine or MSE of the embedding for embedding models.
AdamW, a linear warm-up then cosine decay, stepped per batch from the global step index, so a run
resumed from a checkpoint continues on exactly the schedule of an uninterrupted one.

Data parallel across processes: every rank draws the same global batch (same seeded order and
augmentation), takes its contiguous share, divides its summed loss by the global batch size, and the
gradients are summed over the ranks: each step equals one process's step on the whole global batch,
whatever the number of processes. Unsharded (`sharding="none"`), every rank holds the whole student,
its AdamW state and the teacher, and the gradients are all-reduced. Sharded (`sharding="fsdp"`,
FSDP2's `fully_shard`), each transformer block and the rest of each model are FSDP units: a rank
holds 1/N of the student's weights, gradients and optimizer state (and of the frozen teacher's
weights), gathering one block's weights at a time; the gradients are reduce-scattered by sum, and
the epoch checkpoints are sharded (torch.distributed.checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from amp_deploy.errors import UserError, first_line, require_finite
from amp_deploy.prune.score import rank_world

DistillLoss = Literal["kl", "cosine", "mse"]
Sharding = Literal["none", "fsdp"]
Precision = Literal["fp32", "bf16"]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def hflip(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augment: flip each image left-right with probability 1/2 (drawn from `gen`, alike on every rank)."""
    return torch.where(torch.rand(len(batch), 1, 1, 1, generator=gen) < 0.5, batch.flip(-1), batch)


def default_loss(output: str) -> DistillLoss:
    """KL on logits for classifiers, cosine on the embedding for embedding models."""
    return "kl" if output == "logits" else "cosine"


def resolve_loss(setting: str, output: str) -> tuple[DistillLoss, bool]:
    """distill.loss -> (the loss on the model's output, whether every token of the last block is matched
    too). auto is tokens: the authors' distillation, and on DINOv2 ViT-S/14 the closer student after the
    same epochs (benchmarks/RESULTS.md, "Distillation on every token"); output: the output alone."""
    if setting in ("auto", "tokens"):
        return default_loss(output), True
    if setting == "output":
        return default_loss(output), False
    return setting, False  # kl, cosine or mse on the output alone


def distill_loss(kind: DistillLoss, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-image loss of the student's outputs against the teacher's."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    if kind == "kl":
        log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
        return (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2
    if kind == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=-1)
    return (s - t).pow(2).mean(-1)


def token_loss(student: torch.Tensor, teacher: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-image loss on every token (the CLS token and every patch token) of the last block's output,
    before the final norm: the squared error over the image's tokens relative to the teacher's tokens'
    energy (so the term has no unit and weighs alike in every model). Either token layout
    (batch-first, or tokens-first as open_clip's older towers) is accepted."""
    s, t = (_batch_first(x.float(), batch) for x in (student, teacher))
    return (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)


def _batch_first(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] != batch and x.dim() > 1 and x.shape[1] == batch:
        x = x.transpose(0, 1)
    return x.reshape(batch, -1)


class LastTokens:
    """The output of a model's last block (its hidden states before the final norm), caught by a forward
    hook on the block while the models run; `value` is the latest."""

    def __init__(self, model: nn.Module, blocks: str | None) -> None:
        if blocks is None:
            raise UserError("distill.loss: tokens needs the model's block list")
        self.value: torch.Tensor | None = None
        self._handle = model.get_submodule(blocks)[-1].register_forward_hook(self._hook)

    def _hook(self, _module, _args, out) -> None:
        self.value = out[0] if isinstance(out, (tuple, list)) else out

    def remove(self) -> None:
        self._handle.remove()


class _Criterion:
    """What a step minimises: the output loss (`kind`), plus with `tokens` the every-token loss of the last
    block's output (hooks on both models' last blocks)."""

    def __init__(self, kind: DistillLoss, temperature: float, tokens: bool, student: nn.Module, teacher: nn.Module,
                 blocks: str | None) -> None:
        self.kind, self.temperature = kind, temperature
        self.hooks = (LastTokens(student, blocks), LastTokens(teacher, blocks)) if tokens else None

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = distill_loss(self.kind, out, target, self.temperature)
        if self.hooks is not None:
            s, t = (h.value for h in self.hooks)
            loss = loss + token_loss(s, t.detach(), len(out))
        return loss

    def remove(self) -> None:
        for h in self.hooks or ():
            h.remove()


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class DistillState:
    """What a checkpoint holds: the student, the optimizer, and the epochs finished so far."""

    student: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int  # epochs finished
    losses: list[float] = field(default_factory=list)  # mean loss of each finished epoch
    probe: dict[str, Any] | None = None  # distill.lr auto: the rates tried and the one chosen (kept for a resume)


NO_DECAY_NAMES = ("pos_embed", "position_embedding", "cls_token", "reg_token", "register_tokens", "mask_token",
                  "dist_token", "class_embedding", "positional_embedding")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as ViT recipes use them (timm's param_groups_weight_decay): no decay for 1-D
    parameters (norm weights, biases, layer scales), position embeddings and class/register tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        skip = p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES) or last in NO_DECAY_NAMES
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def distill(student: nn.Module, teacher: nn.Module, images, *, epochs: int, lr: float,
            batch_size: int, warmup: float, weight_decay: float, loss: DistillLoss, temperature: float = 1.0,
            seed: int = 0, device: torch.device | None = None, augment: Augment | None = None,
            autocast: bool = False, resume: DistillState | None = None,
            on_epoch: Callable[[DistillState], None] = lambda s: None,
            on_step: Callable[[int, float], None] = lambda n, loss: None,
            max_steps: int | None = None, sharding: Sharding = "none", blocks: str | None = None,
            checkpointing: bool = False, precision: Precision | None = None,
            checkpoint: ShardedCheckpoint | None = None, tokens: bool = False) -> DistillState:
    """Train `student` (in place) to reproduce `teacher` on `images`; return the final state.

    Args:
        student: the pruned model; trained in place.
        teacher: the original model; frozen, in eval mode.
        images: the training images (already through the model's eval transform) as a tensor on
            the CPU, or a `data.Stream` read batch by batch (its `read(chunks)`).
        epochs: passes over `images`.
        lr: peak learning rate of AdamW.
        batch_size: the global batch (split across processes).
        warmup: epochs of linear warm-up (may be fractional; at most half of all steps).
        weight_decay: AdamW's decoupled weight decay.
        loss: kl (logits), cosine or mse (embeddings).
        temperature: softens both distributions for kl.
        seed: seeds the order and the augmentation of every epoch.
        device: where to train (CPU by default).
        augment: `fn(batch, generator) -> batch`, e.g. one-pixel shifts for digits.
        autocast: bf16 autocast (the same as precision="bf16"; kept for callers of before).
        resume: a state saved by `on_epoch`: training continues after its last finished epoch
            (unsharded; a sharded run resumes from `checkpoint`).
        on_epoch: called with the state after every epoch (the caller saves the checkpoint; sharded:
            the state carries no tensors, `checkpoint` holds them).
        on_step: called with (images in this step, loss) for progress.
        max_steps: stop after this many steps, the schedule (warm-up, decay) fitted to them: a probe.
        sharding: "none" (every rank holds everything) or "fsdp" (FSDP2, every block its own unit;
            needs torch.distributed initialised, one process or more).
        blocks: the path of the block list inside both models (the FSDP units; checkpointing).
        checkpointing: recompute each block's activations in the backward pass instead of keeping
            them (activation checkpointing): less memory, about a third more compute.
        precision: "bf16": the forward and backward in bfloat16 under autocast (sharded, FSDP's bf16
            parameters and gradient reductions too: autocast casts what FSDP does not, the float32
            buffers of rotary embeddings in EVA's attention), the master weights and AdamW state in fp32;
            "fp32": everything in float32.
        checkpoint: sharded runs: where the epoch checkpoints are saved and resumed from.
        tokens: add the loss on every token of the last block's output, before the final norm
            (`token_loss`; the authors' distillation matches the CLS and every patch token there).

    Sharded, the returned state's `student` is the full state dict on rank 0 (on the CPU) and empty on
    the other ranks; `student` itself is left sharded (its parameters are DTensors).
    """
    device = device or torch.device("cpu")
    rank, world = rank_world()
    bf16 = _bf16(precision, autocast)
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    restore = _checkpoint_blocks(student, blocks) if checkpointing else (lambda: None)
    if sharding == "fsdp":
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise UserError("distill.sharding fsdp: needs torch.distributed (amp-deploy build --nproc N, or torchrun)")
        _fully_shard(student, blocks, bf16)
        _fully_shard(teacher, blocks, bf16)
    opt = torch.optim.AdamW(param_groups(student, weight_decay), lr=lr, weight_decay=weight_decay)
    criterion = _Criterion(loss, temperature, tokens, student, teacher, blocks)
    sharded = sharding == "fsdp"
    state = DistillState({} if sharded else student.state_dict(), {} if sharded else opt.state_dict(), 0)
    if sharded and checkpoint is not None:
        resume = checkpoint.load(student, opt)
        state = resume or state
    elif resume is not None:
        student.load_state_dict(resume.student)
        opt.load_state_dict(resume.optimizer)
        state = resume
    per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
        epochs = math.ceil(total / per_epoch)
    warm = min(max(1, round(warmup * per_epoch)), max(1, total // 2))  # a short run decays too
    for epoch in range(state.epoch, epochs):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=gen)
        summed, count = 0.0, 0
        for i, batch in _epoch_batches(images, order, batch_size, per_epoch):
            if epoch * per_epoch + i >= total:
                break
            if augment is not None:
                batch = augment(batch, gen)  # every rank augments the whole global batch alike
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * per_epoch + i, total, warm, lr)
            step_loss = _step(student, teacher, opt, batch.tensor_split(world)[rank], len(batch), criterion,
                              device, bf16, world, sharded)
            if not math.isfinite(step_loss):
                raise UserError(f"distill: the loss became {step_loss} at epoch {epoch + 1}, step {i + 1}: the "
                                f"training diverged; lower distill.lr (now {lr:g})")
            summed += step_loss * len(batch)
            count += len(batch)
            on_step(len(batch), step_loss)
        if not _all_finite(student, world if sharded else 1):  # never keep a non-finite model
            raise UserError(f"distill: the weights hold NaN or Inf after epoch {epoch + 1}: the training diverged; "
                            f"lower distill.lr (now {lr:g})")
        losses = [*state.losses, summed / max(count, 1)]
        if sharded:
            state = DistillState({}, {}, epoch + 1, losses, state.probe)
            if checkpoint is not None:
                checkpoint.save(student, opt, state)
        else:
            state = DistillState(student.state_dict(), opt.state_dict(), epoch + 1, losses, state.probe)
        on_epoch(state)
    restore()
    criterion.remove()
    if sharded:
        state.student = full_state_dict(student)
    return state


def _checkpoint_blocks(model: nn.Module, blocks: str | None) -> Callable[[], None]:
    """Activation checkpointing of every block (its forward recomputed in the backward pass); returns
    what undoes it. Set on the block itself, so an FSDP unit's hooks (on the block's call) gather its
    weights before the recomputation as before the forward."""
    from torch.utils.checkpoint import checkpoint

    if blocks is None:
        raise UserError("distill.checkpointing: the model's block list is unknown")
    wrapped = []
    for block in model.get_submodule(blocks):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        wrapped.append(block)

    def restore() -> None:
        for b in wrapped:
            del b.forward  # the class's forward again

    return restore


def _bf16(precision: str | None, autocast: bool) -> bool:
    """Whether a run is in bf16: distill.precision, or (callers of before) the autocast flag."""
    return precision == "bf16" or (precision is None and autocast)


def _fully_shard(model: nn.Module, blocks: str | None, bf16: bool) -> None:
    """FSDP2 on `model`: each block its own unit, then the rest. FSDP averages the gradients over the
    ranks (a sum with a custom factor needs PREMUL_SUM, which gloo lacks): `_step` scales the loss by
    the world size, so the reduced gradient is the sum the unsharded path all-reduces. A model sharded
    already (the probe's teacher) stays."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return
    if blocks is None:
        raise UserError("distill.sharding fsdp: the model's block list is unknown")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    for block in model.get_submodule(blocks):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def _all_finite(model: nn.Module, world: int) -> bool:
    """Every weight finite (a sharded model: every rank's shards, agreed over the ranks)."""
    local = all(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in model.parameters())
    if world == 1:
        return bool(local)
    flag = torch.tensor([1.0 if local else 0.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict, gathered to rank 0 on the CPU (empty on the other ranks);
    collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ShardedCheckpoint:
    """The epoch checkpoint of a sharded distillation: a folder written by torch.distributed.checkpoint
    (each rank its shards of the student and of AdamW's state) and `meta.json` (settings fingerprint,
    epochs finished, losses, `extra`). Written beside the final folder and renamed into place by rank 0
    once every rank has written (a kill leaves the previous epoch's checkpoint whole). On several
    nodes the output folder must be on a file system every node sees."""

    def __init__(self, path, fingerprint: str, extra: dict | None = None) -> None:
        from pathlib import Path

        self.path, self.fingerprint, self.extra = Path(path), fingerprint, extra or {}

    @property
    def previous(self):
        """Where the last epoch's checkpoint waits while the next is renamed into place (not a temporary
        name: a kill between the two renames leaves it, and `peek` puts it back)."""
        return self.path.with_name(f".{self.path.name}.previous")

    def peek(self) -> dict | None:
        """The checkpoint's meta.json when it belongs to these settings (None otherwise)."""
        import json

        if not self.path.exists() and self.previous.is_dir():  # killed between the two renames of `save`
            try:
                self.previous.rename(self.path)
            except OSError:
                pass  # another rank put it back first
        try:
            meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if meta.get("fingerprint") == self.fingerprint else None

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, state: DistillState) -> None:
        import json
        import shutil

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from amp_deploy.files import fault_point

        rank, _ = rank_world()
        tmp = self.path.with_name(f".{self.path.name}.{state.epoch}.tmpdir")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        torch.distributed.barrier()
        msd, osd = get_state_dict(model, opt)
        with _dcp_errors(f"saving {tmp}"):
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        torch.distributed.barrier()
        if rank == 0:
            meta = {"fingerprint": self.fingerprint, "epoch": state.epoch, "losses": state.losses, **self.extra}
            (tmp / "meta.json").write_text(json.dumps(meta))
            fault_point(self.path)
            old = self.previous
            shutil.rmtree(old, ignore_errors=True)
            if self.path.exists():
                self.path.rename(old)
            fault_point(old)
            tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    def load(self, model: nn.Module, opt: torch.optim.Optimizer) -> DistillState | None:
        """Into the sharded `model` and `opt` (collective); None when there is no checkpoint of these
        settings."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = self.peek()
        if meta is None:
            return None
        msd, osd = get_state_dict(model, opt)
        into = {"model": msd, "optim": osd}
        with _dcp_errors(None, self.path):
            dcp.load(into, checkpoint_id=str(self.path))
        set_state_dict(model, opt, model_state_dict=into["model"], optim_state_dict=into["optim"])
        return DistillState({}, {}, int(meta["epoch"]), list(meta["losses"]), meta.get("probe"))


def _dcp_errors(doing: str | None, damaged=None):
    """torch.distributed.checkpoint's CheckpointException derives from BaseException (no stage guard
    catches it): a damaged checkpoint to resume from becomes one line saying what to do, a failed save
    (a full disk) a RuntimeError the stage guard reports."""
    import contextlib

    from torch.distributed.checkpoint.api import CheckpointException

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except (CheckpointException, Exception) as e:  # noqa: BLE001 - a reader's every error says the same
            if isinstance(e, UserError):
                raise
            what = first_line(e, 200)
            if damaged is not None:
                raise UserError(f"{damaged}: the sharded distillation checkpoint cannot be read ({type(e).__name__}: "
                                f"{what}); remove it (rm -r {damaged}) to start the distillation over") from None
            raise RuntimeError(f"torch.distributed.checkpoint failed {doing}: {what}") from None

    return guard()


FIT_SHARE = 0.8  # the unsharded plan fits when its weights and optimizer state take at most this much of a device
# (the rest for activations, the allocator's slack and the runtime)


def plan_sharding(setting: str, world: int, *, student: int, teacher: int, precision: str,
                  capacity: int | None) -> dict[str, Any]:
    """distill.sharding resolved, with the memory it was resolved on (bytes per process, weights and
    optimizer state, before activations). Unsharded: the student's fp32 weights, gradients and AdamW's
    two moments (16 bytes a parameter) and the fp32 teacher (4); sharded, each of those over `world`
    processes. auto: fsdp when several processes run and the unsharded plan takes more than FIT_SHARE
    of `capacity` (one device's memory)."""
    unsharded = 16 * student + 4 * teacher
    sharded = -(-unsharded // max(1, world))
    if setting == "auto":
        big = capacity is not None and unsharded > FIT_SHARE * capacity
        chosen = "fsdp" if world > 1 and big else "none"
    else:
        chosen = setting
    return {"sharding": chosen, "sharding_setting": setting,
            "memory_plan": {"unsharded_bytes": unsharded, "sharded_bytes": sharded, "capacity_bytes": capacity,
                            "processes": world}}


LR_CANDIDATES = (3e-5, 1e-4, 3e-4)  # fine-tuning a pretrained backbone .. training a small model from scratch


@torch.no_grad()
def distill_eval(student: nn.Module, teacher: nn.Module, images: torch.Tensor, *, batch_size: int,
                 loss: DistillLoss, temperature: float = 1.0, device: torch.device | None = None,
                 bf16: bool = False, tokens: bool = False, blocks: str | None = None) -> float:
    """The mean distillation loss of `student` against `teacher` over `images` (eval mode; `bf16`: under
    autocast, as the training ran)."""
    device = device or torch.device("cpu")
    student.to(device).eval()
    teacher.to(device).eval()
    summed = 0.0
    criterion = _Criterion(loss, temperature, tokens, student, teacher, blocks)
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out, target = student(x), teacher(x)
                summed += float(criterion(out, target).sum())
    finally:
        criterion.remove()
    return summed / max(1, len(images))


def probe_lr(student: nn.Module, teacher: nn.Module, images, held_out: torch.Tensor, *, epochs: int, steps: int,
             candidates: tuple[float, ...] | list[float] = LR_CANDIDATES, on_rate: Callable[[float, float], None]
             = lambda lr, loss: None, **train) -> dict[str, Any]:
    """The peak learning rate for this student, measured: each candidate trains a copy of `student`
    for `steps` steps (the run's schedule fitted to them, same images and seed), then is scored by
    its distillation loss on `held_out` images it never trained on; the lowest loss wins (a tie:
    the smaller rate). `train`: distill()'s other arguments. Returns {"lr", "losses", "steps"}."""
    import copy

    losses: dict[str, float] = {}
    for lr in candidates:
        trial = copy.deepcopy(student)
        try:
            distill(trial, teacher, images, epochs=epochs, lr=lr, max_steps=steps, **train)
        except UserError:  # diverged at this rate
            losses[repr(lr)] = math.inf
            on_rate(lr, math.inf)
            continue
        losses[repr(lr)] = distill_eval(trial, teacher, held_out, batch_size=train["batch_size"], loss=train["loss"],
                                        temperature=train.get("temperature", 1.0), device=train.get("device"),
                                        bf16=_bf16(train.get("precision"), train.get("autocast", False)),
                                        tokens=train.get("tokens", False), blocks=train.get("blocks"))
        on_rate(lr, losses[repr(lr)])
        del trial
    best = min(candidates, key=lambda lr: (losses[repr(lr)] if math.isfinite(losses[repr(lr)]) else math.inf, lr))
    return {"lr": best, "losses": losses, "steps": steps}


def _epoch_batches(images, order: torch.Tensor, batch_size: int, per_epoch: int):
    """(step index, global batch) in the epoch's order: sliced from a tensor, or read from a stream."""
    chunks = [order[i * batch_size:(i + 1) * batch_size].tolist() for i in range(per_epoch)]
    if isinstance(images, torch.Tensor):
        for i, chunk in enumerate(chunks):
            yield i, images[chunk]
    else:
        yield from images.read(chunks)


def _step(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, shard: torch.Tensor, global_n: int,
          criterion: _Criterion, device: torch.device, autocast: bool, world: int, sharded: bool = False) -> float:
    """One optimizer step on the global batch; returns its mean loss (over every rank's images).

    A rank whose share is empty (the last batch of an epoch has fewer images than processes) runs no
    forward but still joins every all-reduce with zero gradients; across processes every parameter
    that trains has a gradient (zeros where unused), so all ranks reduce the same tensors in order.
    Sharded, every rank must run the forward and backward (they gather and reduce-scatter the
    weights): an empty share runs one image whose loss counts zero.
    """
    opt.zero_grad(set_to_none=True)
    summed = torch.zeros((), dtype=torch.float64, device=device)
    if sharded and not len(shard):
        _zero_step(student, teacher, shard.shape[1:], criterion, device, autocast)
    if len(shard):
        shard = shard.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                target = teacher(shard)
            out = student(shard)
        require_finite(target, "distill (the original model)")
        if not torch.isfinite(out.detach()).all():  # the teacher's are finite: the student diverged
            raise UserError("distill: the pruned model's outputs became NaN or Inf: the training diverged; "
                            "lower distill.lr")
        total = criterion(out, target).sum()
        (total * (world if sharded else 1) / global_n).backward()  # sharded: FSDP divides by the world
        summed = total.detach().double()
    if world > 1 and not sharded:
        for p in student.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
        torch.distributed.all_reduce(summed)
    elif world > 1:
        torch.distributed.all_reduce(summed)
    opt.step()
    return float(summed) / global_n


def _zero_step(student: nn.Module, teacher: nn.Module, shape: torch.Size, criterion: _Criterion,
               device: torch.device, autocast: bool = False) -> None:
    """A sharded rank with no images this step: the collectives of a forward and backward, no gradient."""
    x = torch.zeros(1, *shape, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            target = teacher(x)
        out = student(x)
        total = criterion(out, target).sum()
    (total * 0.0).backward()
