"""Importance of every MLP hidden neuron (AMP, step 1).

First-order Taylor: hook the input `a` of each block's fc_out, take its gradient `g = dL/da` under
a loss, and score neuron j by the mean over images and tokens of |a_j * g_j|. The loss is
label-free by default: the entropy of the model's own predictions. Parameters are frozen; only
activations carry gradients. Sums are kept per batch and divided by the number of batches, and
all-reduced across processes when torch.distributed is initialised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F

from amp_deploy.errors import UserError, require_finite
from amp_deploy.numerics import fp32_reference
from amp_deploy.prune.families import Loaded, Output

Criterion = Literal["entropy", "ce", "magnitude", "random"]
Taylor = Literal["abs", "signed"]  # rank neurons by mean |a*g| (the paper's default) or mean a*g


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed, or (0, 1) outside it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def entropy(out: torch.Tensor, output: Output, temperature: float) -> torch.Tensor:
    """Per-image entropy (nats) of the model's predictions; no labels.

    Logits: entropy of softmax(logits). Embeddings: L2-normalise the batch, softmax over
    `temperature * f @ f.T`, entropy of each row.
    """
    out = out.float()
    if output == "embedding":
        f = F.normalize(out.flatten(1), dim=-1)
        out = temperature * f @ f.T
    logp = F.log_softmax(out, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def image_text_entropy(out: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """AMP's CLIP criterion with the text tower: the entropy of image-to-text and of text-to-image
    similarities, averaged. Per image: half its own image-to-text entropy plus half the batch's mean
    text-to-image entropy, so that the mean over images is the paper's average of the two."""
    logits = temperature * F.normalize(out.float().flatten(1), dim=-1) @ F.normalize(text.float(), dim=-1).T
    i2t, t2i = F.log_softmax(logits, dim=1), F.log_softmax(logits, dim=0)
    h_i2t = -(i2t.exp() * i2t).sum(1)
    h_t2i = -(t2i.exp() * t2i).sum(0).mean()
    return 0.5 * h_i2t + 0.5 * h_t2i


def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], classes: list[str]) -> torch.Tensor:
    """One text embedding per class: the mean of the normalised embeddings of CLIP's standard
    ImageNet prompt templates (open_clip's OPENAI_IMAGENET_TEMPLATES) filled with the class name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    out = []
    for name in classes:
        e = F.normalize(encode_text([t(name.replace("_", " ")) for t in OPENAI_IMAGENET_TEMPLATES]), dim=-1)
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out)


def loss_fn(criterion: Criterion, output: Output, temperature: float, text: torch.Tensor | None = None) -> Callable:
    """`fn(out, labels) -> per-image loss` for a criterion that needs gradients.

    `text` (class embeddings from the text tower) turns the entropy into the image-text one.
    """
    if criterion == "ce":
        def ce(out: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            return F.cross_entropy(out.float(), labels, reduction="none")
        return ce
    if text is not None:
        return lambda out, labels: image_text_entropy(out, text.to(out.device), temperature)
    return lambda out, labels: entropy(out, output, temperature)


class _Probe(torch.autograd.Function):
    """Identity on the input of fc_out whose backward hands (a, dL/da) to a sink.

    `a` is kept with save_for_backward, so under activation checkpointing it is dropped after the
    forward and recomputed for the backward like any other saved activation; and the backward runs
    once per batch whether checkpointing recomputes the forward or not.
    """

    @staticmethod
    def forward(ctx, a, sink):
        ctx.save_for_backward(a)
        ctx.sink = sink
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        ctx.sink(a.detach(), g)
        return g, None


def taylor_scores(loaded: Loaded, batches: Iterable, loss: Callable, device: torch.device, *,
                  autocast: bool = False, checkpointing: bool = False) -> dict[str, list[torch.Tensor]]:
    """Mean over batches of the per-batch |a*g| (and signed a*g) at each fc_out input.

    Args:
        loaded: the model; its parameters are frozen while scoring and restored after.
        batches: (images, labels or None) pairs; across processes, this rank's share.
        loss: `fn(out, labels) -> per-image loss`, from `loss_fn`.
        device: where to run.
        autocast: bf16 autocast (CUDA), as the reference code scores.
        checkpointing: recompute block activations in the backward (timm and open_clip models) so
            that giant models fit; the scores are the same.

    Returns:
        {"abs": [...], "signed": [...]}: one tensor of h scores per block, all-reduced across
        processes when torch.distributed is initialised.
    """
    model = loaded.model
    n = len(loaded.sites)
    sums = {"abs": [None] * n, "signed": [None] * n}

    def pre_hook(i: int):
        def hook(_mod, args):
            if torch.is_grad_enabled() and args[0].requires_grad:
                return (_Probe.apply(args[0], lambda a, g: _accumulate(sums, i, a, g)), *args[1:])
            return None
        return hook

    hooks = [loaded.mlp_modules(i)["fc_out"].register_forward_pre_hook(pre_hook(i)) for i in range(n)]
    params = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    _set_checkpointing(model, checkpointing)
    batches_seen = 0
    try:
        with fp32_reference():  # without autocast the scores are fp32 figures
            for x, labels in batches:
                x = x.to(device).requires_grad_(True)
                labels = labels.to(device) if labels is not None else None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out = model(x)
                require_finite(out.detach(), "score")
                loss(out, labels).mean().backward()
                batches_seen += 1
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
        _set_checkpointing(model, False)
    return _finish(sums, batches_seen)


def _set_checkpointing(model: torch.nn.Module, enable: bool) -> None:
    if not hasattr(model, "set_grad_checkpointing"):
        if enable:
            raise UserError(f"prune.checkpointing: {type(model).__name__} has no set_grad_checkpointing()")
        return
    model.set_grad_checkpointing(enable)


def _accumulate(sums: dict, i: int, a: torch.Tensor, g: torch.Tensor) -> None:
    prod = (a.float() * g.float()).flatten(0, -2)  # (images * tokens, h)
    for key, val in (("abs", prod.abs().mean(0)), ("signed", prod.mean(0))):
        sums[key][i] = val if sums[key][i] is None else sums[key][i] + val


def _finish(sums: dict, batches: int) -> dict[str, list[torch.Tensor]]:
    if batches == 0:
        raise ValueError("no calibration batches")
    total = torch.tensor(float(batches))
    stacked = {k: torch.cat(v) for k, v in sums.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for v in stacked.values():
            torch.distributed.all_reduce(v)
        total = total.to(stacked["abs"].device)
        torch.distributed.all_reduce(total)
    sizes = [len(v) for v in sums["abs"]]
    return {k: [s.cpu() / total.cpu() for s in v.split(sizes)] for k, v in stacked.items()}


def magnitude_scores(loaded: Loaded) -> list[torch.Tensor]:
    """Weight-norm baseline: ||fc_in row|| * ||fc_out column|| (gate rows included)."""
    out = []
    for i in range(len(loaded.sites)):
        m = loaded.mlp_modules(i)
        h = m["fc_out"].in_features
        rows = m["fc_in"].weight.detach().float().view(-1, h, m["fc_in"].in_features).norm(dim=-1).prod(0)
        if "gate" in m:
            rows = rows * m["gate"].weight.detach().float().norm(dim=-1)
        out.append((rows * m["fc_out"].weight.detach().float().norm(dim=0)).cpu())
    return out


def random_scores(loaded: Loaded, seed: int) -> list[torch.Tensor]:
    """Random-ranking baseline: seeded uniform scores."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(w, generator=gen) for w in loaded.widths()]
