"""The validate stage's measuring, from plain arguments: one runtime's row and the pruned model's fidelity.

A runtime row holds parity (the runtime vs the torch model it was exported from: same weights, must
be tight), latency of original and pruned measured side by side, and memory. Fidelity is the other
kind of agreement, pruned vs original: the price of pruning. The two are never mixed up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from amp_deploy.deploy.runtimes import Runner, Unavailable
from amp_deploy.deploy.session_memory import SessionSpec, host_peak
from amp_deploy.errors import UserError, first_line
from amp_deploy.measure import metrics as M

Which = Literal["original", "pruned"]
MODELS: tuple[Which, Which] = ("original", "pruned")
UNSTABLE_CV = 0.025  # trtexec's threshold: timings noisier than this compare poorly across builds


def fidelity(ref_original: torch.Tensor, ref_pruned: torch.Tensor, labels: torch.Tensor | None,
             output: str) -> dict[str, Any]:
    """Pruned vs original on the same images: cosine, top-1 agreement (logits), accuracy (labels)."""
    fid = M.agreement(ref_original, ref_pruned)
    out = {k: fid[k] for k in ("cosine_mean", "cosine_min", "top1_agreement", "images")}
    classifier = output != "embedding"  # argmax of an embedding is no class: no agreement, no accuracy
    if not classifier:
        out["top1_agreement"] = None
    out["accuracy_original"] = M.accuracy(ref_original, labels) if classifier else None
    out["accuracy_pruned"] = M.accuracy(ref_pruned, labels) if classifier else None
    out["cosines"] = M.cosines(ref_original, ref_pruned)
    return out


def embedding_fidelity(refs: dict[str, torch.Tensor], labels: torch.Tensor, train: dict[str, torch.Tensor],
                       train_labels: torch.Tensor | None, class_emb: torch.Tensor | None,
                       k: int = M.KNN_K) -> dict[str, Any]:
    """The paper's measures for embedding models, original and pruned: k-NN top-1 (weighted vote,
    as DINO/DINOv2) of the holdout against the calibration images' features, and zero-shot top-1
    from class embeddings."""
    out: dict[str, Any] = {}
    if train_labels is not None:
        out["knn_top1"] = {"k": k, "method": M.KNN_METHOD, "bank": len(train_labels),
                           **{m: M.knn_top1(train[m], train_labels, refs[m], labels, k) for m in MODELS}}
    if class_emb is not None:
        out["zero_shot_top1"] = {m: M.zero_shot_top1(refs[m], class_emb, labels) for m in MODELS}
    return out


def runtime_row(make: Callable[[Which], Runner], *, precision: str, holdout: torch.Tensor,
                refs: dict[str, torch.Tensor], batch_sizes: list[int], batch_range: tuple[int, int],
                warmup: int, iterations: int, warmup_seconds: float = 0.0, parity: bool = True,
                weights_bytes: Callable[[Which], int], on_batch: Callable[[], None] = lambda: None,
                extra: Callable[[dict[str, Runner], dict[str, torch.Tensor]], dict[str, Any]] | None = None,
                session: Callable[[Which], SessionSpec] | None = None) -> dict[str, Any]:
    """Measure one runtime: a row with status "ok", or "skipped"/"failed" and the reason.

    Args:
        make: makes the runner of "original" or "pruned".
        precision: what the runtime computes in (fp16/bf16 rows get the reduced parity gate).
        holdout: real images: parity inputs, and the source of every timed batch.
        refs: the torch models' fp32 outputs on `holdout`, per model.
        batch_sizes: timed batch sizes.
        batch_range: (min, max) batch the exported models accept; parity batches stay inside it.
        warmup, iterations, warmup_seconds: timing settings (see `metrics.latency`).
        parity: compare with `refs` (not for the eager torch row, which *is* the reference).
        weights_bytes: size on disk (or in memory) of each model's weights.
        on_batch: called after each timed batch size (progress).
        extra: given the runners and their outputs on `holdout`, what goes under the row's
            "fidelity" (a quantized row: its price against the original fp32 model).
        session: how a fresh process opens the same session (a CPU runtime on a file): its host memory
            is then measured there (`deploy.session_memory`); without it, in this process, where a
            session can reuse freed pages (a lower bound, said so in the row).
    """
    try:
        largest = M.batch_of(holdout, max(batch_sizes))
        # before this process opens its sessions: never both in memory at once
        fresh = _fresh_process_peaks(session, largest.shape) if session is not None else None
        runners, peaks, device_peak = _start(make, largest, measure=fresh is None)
        peaks, memory_notes = fresh or (peaks, {})
    except Unavailable as e:
        return {"status": "skipped", "reason": str(e)}
    except UserError as e:
        return {"status": "failed", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a runtime that breaks is a report row, not a crash
        return {"status": "failed", "reason": f"{type(e).__name__}: {first_line(e, 400)}"}
    row: dict[str, Any] = {"status": "ok", "precision": precision, "settings": runners["original"].info}
    outputs: dict[str, torch.Tensor] = {}
    if parity:
        row["parity"] = parity_of(runners, holdout, refs, batch_range, outputs)
    if extra is not None:
        row["fidelity"] = extra(runners, outputs)
    row["latency_ms"] = {k: {} for k in MODELS}
    for b in batch_sizes:
        stats = M.latency(runners, M.batch_of(holdout, b), warmup, iterations, warmup_seconds)
        for k in MODELS:
            row["latency_ms"][k][str(b)] = stats[k]
        on_batch()
    unstable = [f"{k} batch {b}: CV {st['cv']:.1%}" for k in MODELS
                for b, st in row["latency_ms"][k].items() if st["cv"] > UNSTABLE_CV]
    if unstable:
        row["warnings"] = [f"unstable timing (coefficient of variation above {UNSTABLE_CV:.1%}): {', '.join(unstable)}"]
    row["speedup"] = {str(b): row["latency_ms"]["original"][str(b)]["p50"] / row["latency_ms"]["pruned"][str(b)]["p50"]
                      for b in batch_sizes}
    row["memory"] = {k: {"weights_bytes": weights_bytes(k), "host_peak_bytes": peaks[k],
                         "host_peak_measured_in": "a fresh process" if session is not None
                         else "this process (a lower bound: it may reuse freed pages)",
                         "device_peak_bytes": device_peak.get(k), "measured_at_batch": max(batch_sizes)}
                     for k in MODELS}
    for k, note in memory_notes.items():
        row["memory"][k]["host_peak_missing"] = note
    return row


def _fresh_process_peaks(session: Callable[[Which], SessionSpec], shape: tuple[int, ...]
                         ) -> tuple[dict[str, int | None], dict[str, str]]:
    from amp_deploy.deploy import session_memory

    got = {k: session_memory.result(session_memory.start(session(k), shape)) for k in MODELS}  # one at a time
    return {k: peak for k, (peak, _) in got.items()}, {k: why for k, (_, why) in got.items() if why}


def _start(make: Callable[[Which], Runner], largest, measure: bool = True) -> tuple[dict, dict, dict]:
    """Both runners, each warmed by one run at the largest batch, with the memory that took (host
    memory only when `measure`)."""

    def create(k: Which) -> Runner:
        r = make(k)
        r.run(largest)
        return r

    if measure:
        throwaway = host_peak(lambda: create("pruned"))  # a first session: one-time library set-up is nobody's peak
        del throwaway
    runners, peaks, device_peak = {}, {}, {}
    for k in MODELS:
        cuda_torch = torch.cuda.is_available()
        if cuda_torch:
            torch.cuda.reset_peak_memory_stats()
        if measure:
            runners[k], peaks[k] = host_peak(lambda k=k: create(k))
        else:
            runners[k] = create(k)
        info = runners[k].info
        if info.get("device_memory_bytes") is not None:  # an engine states what it needs
            device_peak[k] = info["device_memory_bytes"]
        elif str(info.get("device", "")).startswith("cuda"):  # torch on the GPU: what its allocator saw
            device_peak[k] = torch.cuda.max_memory_allocated()
    return runners, peaks, device_peak


class RunnerModel:
    """A runner called like a torch model (tensor in, tensor out), in batches its profile accepts."""

    def __init__(self, runner: Runner, batch_range: tuple[int, int]) -> None:
        self.runner, self.batch_range = runner, batch_range

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.batch_range
        n = len(x)
        if n < lo:  # too few images for the profile: repeated, and the extra outputs dropped
            x = M.repeat_to(x, lo)
        spans = chunks(len(x), lo, hi)
        parts = [torch.from_numpy(self.runner.run(x[a:b].numpy())).float() for a, b in spans]
        out = torch.empty((len(x), *parts[0].shape[1:]))
        for (a, b), part in zip(spans, parts):  # spans may overlap at the end (see `chunks`)
            out[a:b] = part
        return out[:n]


def quantized_fidelity(outputs: dict[str, torch.Tensor], ref_original: torch.Tensor, labels: torch.Tensor | None,
                       output: str) -> dict[str, Any]:
    """What quantization costs against the original fp32 model: the quantized original (quantization
    alone) and the quantized pruned model (pruning and quantization together)."""
    out = {}
    for k in MODELS:
        f = fidelity(ref_original, outputs[k], labels, output)
        del f["cosines"], f["accuracy_original"]
        f["accuracy"] = f.pop("accuracy_pruned")
        out[k] = f
    return out


def chunks(n: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Split n images into (start, stop) batches of at most `hi`; a last batch under `lo` is widened
    backwards (overlapping the one before) so that every batch stays inside the engine's profile."""
    out = [(i, min(i + hi, n)) for i in range(0, n, hi)]
    if out and out[-1][1] - out[-1][0] < lo:
        out[-1] = (max(0, n - lo), n)
    return out


def parity_of(runners: dict[str, Runner], holdout: torch.Tensor, refs: dict[str, torch.Tensor],
              batch_range: tuple[int, int], outputs: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Each runner's outputs on every holdout image vs the torch reference; the worst of both models.
    `outputs`, when given, receives each runner's outputs (the holdout's, in order)."""
    n, lo = len(holdout), batch_range[0]
    if n < lo:  # judged on the holdout repeated to the smallest batch the profile takes
        holdout, refs = M.repeat_to(holdout, lo), {k: M.repeat_to(v, lo) for k, v in refs.items()}
    per = {}
    for k, r in runners.items():
        got = RunnerModel(r, batch_range)(holdout).reshape(refs[k].shape)
        per[k] = M.agreement(refs[k], got)
        if outputs is not None:
            outputs[k] = got[:n]  # one output per holdout image, as the labels
    worst = {"max_abs_err": max(p["max_abs_err"] for p in per.values()),
             "cosine_min": min(p["cosine_min"] for p in per.values())}
    return {**worst, **per}
