"""Importance of every MLP hidden neuron (AMP, step 1).

First-order Taylor, as the reference code (visresearch/AMP) scores: hook the input `a` of each
block's fc_out, take its gradient `g = dL/da` under a loss, and score neuron j per image by
|sum over tokens of a_j * g_j|, averaged over the images of a batch. The loss is label-free by
default: the entropy of the model's own predictions. Parameters are frozen; only activations carry
gradients. Per-batch scores are summed and divided by the number of batches, and all-reduced
across processes when torch.distributed is initialised.

Views (what the softmax of the loss is taken over), each with an inverse temperature T:
- image-image: T * cosine similarities of the batch's features (the reference's loss for CLIP and
  DINOv2 towers; T = 15 CLIP, 20 DINOv2 in its configs);
- predictions: T * class logits (a classifier head; T = 1 by default);
- image-text: T * image-to-prompt similarities, both directions (CLIP with its text tower).
Across processes every rank takes its own batch (similarities are B x B, not the reference's
B x B*world): scores do not depend on the number of processes, and a threshold means the same
on one GPU and on eight.

The search (search.py) measures the same view either as a level (the entropy, as the reference
does) or as the departure from the original model (`divergence`: KL of the original's
distribution to the pruned model's, per image), which is zero for the unpruned model and cannot
fall below it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from amp_deploy.errors import UserError, require_finite
from amp_deploy.numerics import fp32_reference
from amp_deploy.prune.families import Loaded

Criterion = Literal["entropy", "ce", "magnitude", "random"]
# per image |token sum of a*g| (the reference's default), per token |a*g| (its commented-out
# variant), or the signed token sum
Taylor = Literal["abs", "token", "signed"]
TAYLOR_KINDS: tuple[str, ...] = Taylor.__args__
View = Literal["predictions", "image-image", "image-text"]
SearchLoss = Literal["divergence", "entropy", "cosine"]
DEFAULT_TEMPERATURE = {"predictions": 1.0, "image-image": 15.0, "image-text": 15.0}


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed, or (0, 1) outside it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def view_logits(out: torch.Tensor, view: View, temperature: float) -> torch.Tensor:
    """The logits the loss's softmax is taken over (rows): T * logits, or T * the batch's cosine
    similarities (image-image)."""
    out = out.float()
    if view == "image-image":
        f = F.normalize(out.flatten(1), dim=-1)
        return temperature * f @ f.T
    return temperature * out


def entropy(out: torch.Tensor, view: View | str, temperature: float) -> torch.Tensor:
    """Per-image entropy (nats) of the model's predictions; no labels.

    `view` "logits"/"predictions": entropy of softmax(T * logits); "embedding"/"image-image": L2-normalise
    the batch, softmax over `T * f @ f.T`, entropy of each row.
    """
    logp = F.log_softmax(view_logits(out, _view(view), temperature), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _view(view: str) -> View:
    return {"logits": "predictions", "embedding": "image-image"}.get(view, view)  # type: ignore[return-value]


def default_view(output: str) -> View:
    """predictions for a classifier head, image-image for an embedding model."""
    return "predictions" if output == "logits" else "image-image"


def image_text_entropy(out: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """AMP's CLIP criterion with the text tower: the entropy of image-to-text and of text-to-image
    similarities, averaged. Per image: half its own image-to-text entropy plus half the batch's mean
    text-to-image entropy, so that the mean over images is the paper's average of the two."""
    i2t, t2i = _image_text_logp(out, text, temperature)
    h_i2t = -(i2t.exp() * i2t).sum(1)
    h_t2i = -(t2i.exp() * t2i).sum(0).mean()
    return 0.5 * h_i2t + 0.5 * h_t2i


def _image_text_logp(out: torch.Tensor, text: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = temperature * F.normalize(out.float().flatten(1), dim=-1) @ F.normalize(text.float(), dim=-1).T
    return F.log_softmax(logits, dim=1), F.log_softmax(logits, dim=0)


def divergence(out: torch.Tensor, ref: torch.Tensor, view: View, temperature: float,
               text: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image KL(original || pruned) of the view's distributions: 0 for the original model.

    image-image: row i of softmax(T * f f^T) of the original's features against the pruned model's;
    predictions: the class distributions; image-text: both directions, averaged as in the entropy.
    """
    if view == "image-text":
        (p1, p0), (q1, q0) = _image_text_logp(ref, text, temperature), _image_text_logp(out, text, temperature)
        return 0.5 * (p1.exp() * (p1 - q1)).sum(1) + 0.5 * (p0.exp() * (p0 - q0)).sum(0).mean()
    logp = F.log_softmax(view_logits(ref, view, temperature), dim=-1)
    logq = F.log_softmax(view_logits(out, view, temperature), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], classes: list[str]) -> torch.Tensor:
    """One text embedding per class: the mean of the normalised embeddings of CLIP's standard
    ImageNet prompt templates (open_clip's OPENAI_IMAGENET_TEMPLATES) filled with the class name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    out = []
    for name in classes:
        e = F.normalize(encode_text([t(name.replace("_", " ")) for t in OPENAI_IMAGENET_TEMPLATES]), dim=-1)
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out)


def loss_fn(criterion: Criterion, view: View | str, temperature: float, text: torch.Tensor | None = None) -> Callable:
    """`fn(out, labels) -> per-image loss` for a criterion that needs gradients (scoring).

    `view`: predictions | image-image | image-text (the older "logits"/"embedding" name the first
    two); `text` (class embeddings from the text tower) is needed for image-text.
    """
    if criterion == "ce":
        def ce(out: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor | None = None) -> torch.Tensor:
            return F.cross_entropy(out.float(), labels, reduction="none")
        return ce
    if text is not None or view == "image-text":
        if text is None:
            raise ValueError("the image-text view needs the class prompts' text embeddings")
        return lambda out, labels, ref=None: image_text_entropy(out, text.to(out.device), temperature)
    return lambda out, labels, ref=None: entropy(out, view, temperature)


class Divergence:
    """The search loss `divergence`: `fn(out, labels, ref) -> per-image KL` of the original's
    distribution (`ref`: the unpruned model's outputs on the same batch) to the pruned model's."""

    reference = True  # the search hands it the original's outputs

    def __init__(self, view: View | str, temperature: float, text: torch.Tensor | None = None) -> None:
        self.view, self.temperature, self.text = _view(view), temperature, text

    def __call__(self, out: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
        text = self.text.to(out.device) if self.text is not None else None
        return divergence(out, ref.to(out.device), self.view, self.temperature, text)


class CosineDeparture:
    """The search loss `cosine`: per image, 1 - cosine of the pruned model's output to the original's
    (`ref`), whatever the view: a change the batch's similarity structure does not see (every
    embedding moved alike) still counts."""

    reference = True

    def __call__(self, out: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.nn.functional.cosine_similarity(out.float().flatten(1), ref.to(out.device).flatten(1), dim=1)


def search_loss_fn(kind: SearchLoss, criterion: Criterion, view: View | str, temperature: float,
                   text: torch.Tensor | None = None) -> Callable:
    """The search's loss: the criterion's own loss as a level (`entropy`, the reference's; `ce`
    with labels), `divergence` from the original in the same view, or the `cosine` departure of
    the output from the original's."""
    if kind == "cosine" and criterion != "ce":
        return CosineDeparture()
    if kind == "divergence" and criterion != "ce":
        return Divergence(view, temperature, text)
    return loss_fn(criterion, view, temperature, text)


@contextlib.contextmanager
def loss_features(loaded: Loaded, view: str) -> Iterator[None]:
    """While scoring and searching, open_clip towers give the features BEFORE `visual.proj`, as the
    reference code scores them (it sets proj = None); the image-text view keeps the projection,
    which maps into the text tower's space."""
    model = loaded.model
    proj = getattr(model, "proj", None)
    if loaded.spec.get("source") != "open_clip" or view == "image-text" or proj is None:
        yield
        return
    model.proj = None
    try:
        yield
    finally:
        model.proj = proj


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
    """Mean over batches of the per-batch Taylor scores at each fc_out input.

    Args:
        loaded: the model; its parameters are frozen while scoring and restored after.
        batches: (images, labels or None) pairs; across processes, this rank's share.
        loss: `fn(out, labels) -> per-image loss`, from `loss_fn`.
        device: where to run.
        autocast: bf16 autocast (CUDA), as the reference code scores.
        checkpointing: recompute block activations in the backward (timm and open_clip models) so
            that giant models fit; the scores are the same.

    Returns:
        {"abs": [...], "token": [...], "signed": [...]} (see `Taylor`): one tensor of h scores per
        block, all-reduced across processes when torch.distributed is initialised; and where the
        model's attention is of a known kind, the same three for its heads ("heads.abs", ...: one
        score per head and block), from the same backward pass. A head's score is the Taylor term of
        a gate on its output: at the input of the attention's output projection, the sum of a*g over
        the head's channels, then the same per-image aggregation as a neuron's.
    """
    model = loaded.model
    n = len(loaded.sites)
    # zeros to start from: a rank that gets no batch still joins the all-reduce with its (empty) sums
    sums = {k: [torch.zeros(w, device=device) for w in loaded.widths()] for k in TAYLOR_KINDS}
    attn, heads = loaded.attn, loaded.heads()
    if attn is not None:
        sums.update({f"heads.{k}": [torch.zeros(h, device=device) for h in heads] for k in TAYLOR_KINDS})

    def pre_hook(i: int, prefix: str = "", group: int = 1):
        def sink(a: torch.Tensor, g: torch.Tensor) -> None:
            _accumulate(sums, i, a, g, prefix, group)

        def hook(_mod, args):
            if torch.is_grad_enabled() and args[0].requires_grad:
                return (_Probe.apply(args[0], sink), *args[1:])
            return None
        return hook

    hooks = [loaded.mlp_modules(i)["fc_out"].register_forward_pre_hook(pre_hook(i)) for i in range(n)]
    if attn is not None:
        hooks += [loaded.attn_modules(i)["proj"].register_forward_pre_hook(pre_hook(i, "heads.", attn[i].head_dim))
                  for i in range(n)]
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


def _accumulate(sums: dict, i: int, a: torch.Tensor, g: torch.Tensor, prefix: str = "", group: int = 1) -> None:
    """One batch's scores: per image |sum over tokens of a*g| averaged over the images (the
    reference's), per token |a*g| averaged over images and tokens, and the signed token sum. With
    `group` (a head's channels), a*g is first summed over each group of channels: a head's gate."""
    prod = a.float() * g.float()  # (images, tokens..., h)
    if group > 1:
        prod = prod.unflatten(-1, (-1, group)).sum(-1)  # (images, tokens..., heads)
    per_image = prod.flatten(1, -2).sum(1) if prod.dim() > 2 else prod  # (images, h)
    values = {"abs": per_image.abs().mean(0), "token": prod.flatten(0, -2).abs().mean(0), "signed": per_image.mean(0)}
    for key, val in values.items():
        key = prefix + key
        sums[key][i] = sums[key][i] + val.to(sums[key][i].device)


def _finish(sums: dict, batches: int) -> dict[str, list[torch.Tensor]]:
    stacked = {k: torch.cat(v) for k, v in sums.items()}
    total = torch.tensor(float(batches), device=stacked["abs"].device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for v in stacked.values():
            torch.distributed.all_reduce(v)
        torch.distributed.all_reduce(total)
    if total.item() == 0:
        raise UserError("score: no calibration image could be read (every file was unreadable or the set is "
                        "empty); check data.path and data.calibration")
    return {k: [s.cpu() / total.cpu() for s in v.split([len(t) for t in sums[k]])] for k, v in stacked.items()}


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


def head_magnitude_scores(loaded: Loaded) -> list[torch.Tensor] | None:
    """Weight-norm baseline for heads: ||the head's value rows|| * ||its output-projection columns||
    (None where the attention is of no known kind)."""
    sites = loaded.attn
    if sites is None:
        return None
    out = []
    for i, site in enumerate(sites):
        m = loaded.attn_modules(i)
        inner = m["proj"].in_features
        v = m["v"].weight if "v" in m else m["qkv"].weight[2 * inner:]
        rows = v.detach().float().view(-1, site.head_dim, v.shape[1]).flatten(1).norm(dim=1)
        cols = m["proj"].weight.detach().float().T.reshape(-1, site.head_dim * m["proj"].out_features).norm(dim=1)
        out.append((rows * cols).cpu())
    return out


def head_random_scores(loaded: Loaded, seed: int) -> list[torch.Tensor] | None:
    heads = loaded.heads()
    if heads is None:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.rand(h, generator=gen) for h in heads]
