"""Measuring helpers: FLOPs, predictions, agreement, accuracy, latency statistics, host memory.

Two kinds of agreement are kept apart: parity (same weights, another runtime; must be tight) and
fidelity (pruned vs original; the price of pruning).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amp_deploy.data import Split, Stream
from amp_deploy.errors import require_finite
from amp_deploy.numerics import fp32_reference, median_ratio  # noqa: F401 - re-exported


class _Totals:
    """Stands in for FlopCounterMode's module tracker: we need the total only. The tracker hooks
    every module's backward, which fails inside some heads (timm's SigLIP attention-pool head:
    "Expected gradient function to be set"), so counting would break on those families."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _Totals:
        return self

    def __exit__(self, *exc) -> None:
        return None


def count_flops(model: torch.nn.Module, input_size: tuple[int, int, int]) -> int:
    """Forward FLOPs for one image, counted by torch.utils.flop_counter (totals, no per-module
    breakdown). Scaled dot-product attention on the CPU runs an op the counter has no formula for
    (`_scaled_dot_product_flash_attention_for_cpu`: counted 0, the one term that scales with heads and
    tokens): it is given the formula of the GPU kernels, the two attention products."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    x = torch.randn(1, *input_size, device=next(model.parameters()).device)
    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        extra[cpu_sdpa] = sdpa
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    counter.mod_tracker = _Totals()
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split | Stream, batch_size: int, device: torch.device) -> torch.Tensor:
    """The model's fp32 outputs for every image of `split`, on the CPU."""
    return predict_labelled(model, split, batch_size, device)[0]


@torch.no_grad()
def predict_labelled(model: torch.nn.Module, split: Split | Stream, batch_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs and the labels of the images read (a stream may skip unreadable ones)."""
    outs, labels = [], []
    with fp32_reference():
        for x, y in split.batches(batch_size):
            outs.append(model(x.to(device)).float().cpu())
            labels.append(y)
    out = torch.cat(outs)
    require_finite(out, "validate")
    return out, (torch.cat(labels) if labels and labels[0] is not None else None)


KNN_K, KNN_T = 20, 0.07  # DINO/DINOv2's k-NN evaluation: k = 20, votes weighted by exp(cosine / 0.07)
KNN_METHOD = f"weighted k-NN, k = {KNN_K}, votes exp(cosine / {KNN_T}) (DINO/DINOv2 evaluation)"


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             k: int = KNN_K, temperature: float = KNN_T) -> float:
    """k-NN top-1 in percent, as DINO and DINOv2 evaluate features: each test feature takes the
    class with the largest sum of exp(cosine / temperature) among its k nearest training features."""
    return knn_correct(train, train_labels, test, test_labels, k, temperature).float().mean().item() * 100


def knn_correct(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                k: int = KNN_K, temperature: float = KNN_T) -> torch.Tensor:
    """Per test image, whether `knn_top1`'s vote is its label (for paired comparisons of two models)."""
    a, b = F.normalize(test.float().flatten(1), dim=-1), F.normalize(train.float().flatten(1), dim=-1)
    sims, idx = (a @ b.T).topk(min(k, len(b)), dim=-1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = torch.zeros(len(a), classes).scatter_add_(1, train_labels[idx], (sims / temperature).exp())
    return votes.argmax(-1) == test_labels


def zero_shot_top1(image_features: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Zero-shot top-1 in percent: the class whose (normalised) text embedding is nearest."""
    logits = F.normalize(image_features.float(), dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).T
    return (logits.argmax(-1) == labels).float().mean().item() * 100


def agreement(ref: np.ndarray | torch.Tensor, out: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Cosine per image (min, mean, p1) and, for logits, top-1 agreement; plus error figures."""
    ref, out = torch.as_tensor(ref).float().flatten(1), torch.as_tensor(out).float().flatten(1)
    cos = F.cosine_similarity(ref, out, dim=1)
    err = (ref - out).abs()
    rel = err / ref.abs().clamp_min(1e-6)
    return {
        "max_abs_err": err.max().item(),
        "p99_abs_err": torch.quantile(err.flatten(), 0.99).item(),
        "max_rel_err": rel.max().item(),
        "cosine_min": cos.min().item(),
        "cosine_mean": cos.mean().item(),
        "top1_agreement": (ref.argmax(1) == out.argmax(1)).float().mean().item(),
        "images": len(ref),
    }


def cosines(ref: torch.Tensor, out: torch.Tensor) -> list[float]:
    """Cosine similarity of each image's outputs."""
    return F.cosine_similarity(ref.float().flatten(1), out.float().flatten(1), dim=1).tolist()


def accuracy(logits: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    """Top-1 in percent; None without labels or when the outputs are no class logits for them."""
    if labels is None or logits.shape[-1] <= int(labels.max()):
        return None
    return (logits.argmax(-1) == labels).float().mean().item() * 100


def _stats(samples_ms: list[float], batch: int) -> dict[str, float]:
    a = np.asarray(samples_ms)
    mean = float(a.mean())
    return {
        "min": float(a.min()), "mean": mean, "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)), "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)), "max": float(a.max()),
        "cv": float(a.std() / mean) if mean else 0.0,
        "throughput": batch * 1000.0 / float(np.percentile(a, 50)),
        "iterations": len(a),
        "samples": [round(float(v), 5) for v in a],  # in timing order: `compare` tests a change on them
    }


def latency(runners: dict, x: np.ndarray, warmup: int, iterations: int,
            warmup_seconds: float = 0.0) -> dict[str, dict[str, Any]]:
    """Time several runners on the same input, interleaved so that drift hits all of them alike.

    Warm-up lasts `warmup` rounds and at least `warmup_seconds`. Each timed round runs every runner
    once, in an order that rotates every round. Host latency includes the runner's sync; a runner
    with `events` (CUDA) also reports device time between CUDA events.

    With several runners, each timed call follows one untimed call of the same runner: ONNX
    Runtime's CPU thread pools spin for a while after a run, so the call after ANOTHER session's
    run shares the cores with that session's spinning threads (DINOv2 ViT-S/14 at batch 8 on 2
    cores: 86 ms instead of 66, and speedup ratios scattered from 1.0 to 1.25 where the settled
    calls gave 1.14 twice). The settling call puts each runner in the state a server calling it
    back to back keeps it in.
    """
    names = list(runners)
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < warmup_seconds:
        for n in names:
            runners[n].run(x)
        done += 1
    host: dict[str, list[float]] = {n: [] for n in names}
    device: dict[str, list[float]] = {n: [] for n in names}
    for it in range(iterations):
        shift = it % len(names)
        for n in names[shift:] + names[:shift]:
            r = runners[n]
            if len(names) > 1:
                r.run(x)  # settle: the previous runner's spinning threads are not this one's cost
                if r.sync:
                    r.sync()
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if r.events else None
            t0 = time.perf_counter_ns()
            if ev:
                ev[0].record()
            r.run(x)
            if ev:
                ev[1].record()
            if r.sync:
                r.sync()
            host[n].append((time.perf_counter_ns() - t0) / 1e6)
            if ev:
                device[n].append(ev[0].elapsed_time(ev[1]))
    out = {}
    for n in names:
        out[n] = _stats(host[n], len(x))
        if device[n]:
            out[n]["device"] = _stats(device[n], len(x))
        out[n]["warmup_rounds"] = done
    return out


def repeat_to(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of `t` repeated as often as needed."""
    return t.repeat(-(-n // len(t)), *([1] * (t.dim() - 1)))[:n]


def batch_of(images: torch.Tensor, batch: int) -> np.ndarray:
    """A batch of real images (repeated if the holdout is smaller than the batch)."""
    return repeat_to(images, batch).numpy().astype(np.float32)
