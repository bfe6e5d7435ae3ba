"""One command that proves every CUDA path at the paper's scale: `make gpu-check` (or `--cpu-smoke`).

Sections, each timed and recorded as ok / failed (with the reason) / not run (with the reason), so one
failure never hides the others:
  pytest     `pytest -m "gpu or trt"` (TensorRT tests skip where it is missing, with their reason)
  quickstart the quickstart build end to end with --device cuda, runtimes onnxruntime and torch
  scale      AMP on a random-init ViT-g/14 (timm's DINOv2-giant factory, packed SwiGLU) at 224x224:
             scoring images/s (bf16 autocast, activation checkpointing), search wall time cached vs
             the reference scheme on the same threshold, peak GPU memory of each, the largest
             calibration batch that fits
  bf16       bf16 vs fp32 scoring on a ViT-B/16: rank correlation of the scores, whether widths agree
  latency    original vs pruned ViT-L/14 and ViT-g/14 (widths from a real budget search removing
             about 40% of MLP neurons, and the same widths aligned to 64): torch eager fp16 and
             torch.compile at batch 1, 32, 128: p50, throughput, and the FLOP ratio beside them
  sharded    distillation sharded with FSDP2 (distill.sharding fsdp) through torchrun with NCCL: one
             process, then every GPU when there are several; a ViT-L/14 student (0.6 of its MLP
             neurons) from the whole ViT-L/14, fp32 then bf16, activation checkpointing: steps/s, peak
             GPU memory per rank, and the N-process student's largest difference to the 1-process one
Sections run most important first, each checked against the time left (`--budget`, 540 s: one
10-minute device call with the machine's start excluded) and skipped as "not run (time)" when its
estimate does not fit; results are saved after every section (and latency rows as they are
measured) to OUT/gpu_check.json and OUT/gpu_check.md (OUT: `--out`, default $OUT, the folder the
device tool brings back), with the device's name and the date; the table is printed at the end.
The quickstart build runs in a temporary folder; only its report.json is kept (OUT/quickstart_report.json).

`--cpu-smoke` runs the same code on tiny models on the CPU (no pytest, no torch.compile, no
quickstart rerun) in well under a minute: it proves the script, never a GPU figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from amp_deploy.data import load_synthetic_data  # noqa: E402
from amp_deploy.files import write_text  # noqa: E402
from amp_deploy.measure.metrics import count_flops, latency  # noqa: E402
from amp_deploy.prune.families import Loaded, count_params, load_timm, spread_init  # noqa: E402
from amp_deploy.prune.rebuild import apply_widths  # noqa: E402
from amp_deploy.prune.score import DEFAULT_TEMPERATURE, Divergence, default_view, loss_fn, taylor_scores  # noqa: E402
from amp_deploy.prune.search import adaptive_widths, budget_widths, uniform_widths, width_grid  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL = {  # model name, factory kwargs
    "giant": ("vit_giant_patch14_dinov2", {"img_size": 224}),
    "large": ("vit_large_patch14_dinov2", {"img_size": 224}),
    "base": ("vit_base_patch16_224", {}),
}
SMOKE = {
    "giant": ("vit_giant_patch14_dinov2", {"img_size": 28, "depth": 2, "embed_dim": 96, "num_heads": 2}),
    "large": ("vit_large_patch14_dinov2", {"img_size": 28, "depth": 2, "embed_dim": 64, "num_heads": 2}),
    "base": ("vit_base_patch16_224", {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}),
}


class Check:
    """Runs sections in order of importance, saving after each; a failing section is recorded, not
    raised, and a section whose estimate does not fit the time left is recorded "not run (time)"."""

    def __init__(self, budget_s: float, save: Callable[[], None]) -> None:
        self.start, self.budget_s, self.sections, self.save = time.perf_counter(), budget_s, {}, save

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def run(self, name: str, fn: Callable[[dict], dict | None], skip: str | None = None, estimate_s: float = 0.0) -> None:
        """`fn(record)` fills `record` as it measures (figures survive a failure half-way) and may return more."""
        if skip is None and estimate_s > self.left():
            skip = f"time: needs about {estimate_s:.0f} s, {max(self.left(), 0):.0f} s of the {self.budget_s:.0f} s left"
        if skip:
            self.sections[name] = {"status": "not run", "reason": skip}
            print(f"[{name}] not run: {skip}", flush=True)
            self.save()
            return
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        record: dict = {"status": "running"}
        self.sections[name] = record
        try:
            record.update(fn(record) or {})
            record["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a section that breaks is a result, the others still run
            record.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500],
                          traceback=traceback.format_exc()[-2000:])
        record["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] {record['status']} in {record['seconds']} s", flush=True)
        self.save()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def _model(spec: tuple[str, dict], device: torch.device, seed: int = 0) -> Loaded:
    torch.manual_seed(seed)
    loaded = load_timm(spec[0], False, spec[1])
    spread_init(loaded.model)  # LayerScale 1e-5 at random init makes every embedding alike: checks would prove nothing
    loaded.model.to(device)
    return loaded


def _data(loaded: Loaded, calibration: int, validation: int):
    return load_synthetic_data(calibration=calibration, validation=validation, holdout=1, seed=0,
                               transform=loaded.transform, size=loaded.input_size[1:])


# --- sections --------------------------------------------------------------------------------------


def section_pytest(record: dict) -> dict:
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu or trt", "-q", "-rs", "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|deselected)|"
                                                                          r"no tests ran", ln)), "")
    if res.returncode not in (0, 5):
        raise RuntimeError(f"pytest exit {res.returncode}: {summary or ' | '.join(lines[-3:])}")
    return {"exit": res.returncode, "summary": summary, "skips": [ln for ln in lines if "SKIP" in ln][:12]}


def section_quickstart(device: torch.device, out: Path, record: dict) -> dict:
    """The quickstart build in a temporary folder; only its report.json is kept, under OUT."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "quickstart"
        cmd = [sys.executable, "-m", "amp_deploy.cli", "build", str(REPO / "recipes" / "quickstart.yaml"), "--out",
               str(folder), "--device", device.type, "--force", "runtimes=[onnxruntime, torch]"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"build exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
        shutil.copyfile(folder / "report.json", out / "quickstart_report.json")
    rep = json.loads((out / "quickstart_report.json").read_text())
    rows = {n: {"status": r["status"], "speedup": r.get("speedup"), "max_abs_err": (r.get("parity") or {}).get(
        "max_abs_err"), "settings": r.get("settings")} for n, r in rep["runtimes"].items()}
    return {"params_ratio": rep["params"]["ratio"], "accuracy": [rep["fidelity"]["accuracy_original"],
            rep["fidelity"]["accuracy_pruned"]], "widths": rep["widths"]["pruned"], "runtimes": rows,
            "device": rep["environment"]["device"], "gpu": rep["environment"]["gpu"]}


def _view(loaded: Loaded) -> tuple[str, float]:
    view = default_view(loaded.output)
    return view, 20.0 if view == "image-image" else DEFAULT_TEMPERATURE[view]  # DINOv2: the reference's 20


def _search_loss(loaded: Loaded) -> Divergence:
    """The build's default search loss (divergence from the original, in the scoring view)."""
    return Divergence(*_view(loaded))


def _score(loaded: Loaded, batches, device, autocast: bool, checkpointing: bool):
    loss = loss_fn("entropy", *_view(loaded))
    return taylor_scores(loaded, batches, loss, device, autocast=autocast, checkpointing=checkpointing)["abs"]


def largest_batch(loaded: Loaded, device: torch.device, start: int, limit: int, record: dict) -> None:
    """Double the calibration batch until one fwd+bwd (bf16, checkpointing) runs out of memory; each
    batch is written into `record` as soon as it is measured (a failure keeps the figures before it)."""
    record.update(largest_fitting=None, tried=[], limit=limit)
    b = start
    while b <= limit:
        _peak_reset(device)
        try:
            x = torch.randn(b, *loaded.input_size, device=device)
            _score(loaded, [(x, None)], device, autocast=True, checkpointing=True)
            _sync(device)
            record["largest_fitting"] = b
            record["tried"].append([b, "fits", _peak(device)])
        except torch.OutOfMemoryError:
            record["tried"].append([b, "out of memory", None])
            break
        except Exception as e:  # noqa: BLE001 - another allocation failure ends the probe, figures kept
            record["tried"].append([b, f"failed: {type(e).__name__}: {str(e)[:200]}", None])
            break
        finally:
            x = None
        b *= 2
    _peak_reset(device)


def section_scale(models: dict, device: torch.device, smoke: bool, calibration: int, validation: int,
                  record: dict) -> None:
    loaded = _model(models["giant"], device)
    data = _data(loaded, calibration, validation)
    record.update(model=models["giant"][0], params=count_params(loaded.model), images=[calibration, validation],
                  input=list(loaded.input_size))
    warm = [next(data.calibration.batches(32))]
    _score(loaded, warm, device, autocast=True, checkpointing=True)  # warm-up: kernels, allocator, autotuning
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    scores = _score(loaded, data.calibration.batches(32), device, autocast=True, checkpointing=True)
    _sync(device)
    secs = time.perf_counter() - t0
    record["score"] = {"seconds": round(secs, 2), "images_per_s": round(calibration / secs, 1),
                       "peak_bytes": _peak(device), "batch": 32, "bf16_autocast": True, "checkpointing": True,
                       "warmed_up": True}
    record["scores_spread"] = _spread(scores)
    loss = _search_loss(loaded)
    # both schemes warmed alike: one untimed cached search first, then naive, cached (timed) in turn
    adaptive_widths(copy.deepcopy(loaded), scores, data.validation, loss=loss, threshold=0.01, batch_size=32,
                    device=device, cached=True, autocast=True, steps=1)
    for mode in ("naive", "cached"):
        target = copy.deepcopy(loaded)
        _peak_reset(device)
        _sync(device)
        t0 = time.perf_counter()
        res = adaptive_widths(target, scores, data.validation, loss=loss, threshold=0.01, batch_size=32,
                              device=device, cached=mode == "cached", autocast=True)
        _sync(device)
        record[f"search_{mode}"] = {"seconds": round(time.perf_counter() - t0, 2), "peak_bytes": _peak(device),
                                    "block_forwards": res.block_forwards, "widths": res.widths}
        del target
    record["search_same_widths"] = record["search_cached"]["widths"] == record["search_naive"]["widths"]
    record["largest_calibration_batch"] = {}
    largest_batch(loaded, device, 4 if smoke else 64, 16 if smoke else 2048, record["largest_calibration_batch"])


def _spread(scores: list[torch.Tensor]) -> dict:
    """Whether the scores say anything: their largest value and the mean per-block coefficient of variation."""
    cv = [float(s.std() / s.mean().clamp_min(1e-30)) for s in scores]
    return {"max": float(max(s.max() for s in scores)), "cv_mean": sum(cv) / len(cv)}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def section_bf16(models: dict, device: torch.device, calibration: int, validation: int, record: dict) -> dict:
    loaded = _model(models["base"], device)
    data = _data(loaded, calibration, validation)
    s32 = _score(loaded, data.calibration.batches(32), device, autocast=False, checkpointing=False)
    s16 = _score(loaded, data.calibration.batches(32), device, autocast=True, checkpointing=False)
    rho = [_spearman(a, b) for a, b in zip(s32, s16)]
    record.update(spearman_min=min(rho), scores_spread=_spread(s32))
    loss = _search_loss(loaded)
    widths = {}
    for name, s in (("fp32", s32), ("bf16", s16)):
        widths[name] = adaptive_widths(copy.deepcopy(loaded), s, data.validation, loss=loss, threshold=0.01,
                                       batch_size=32, device=device).widths
    return {"model": models["base"][0], "spearman_min": min(rho), "spearman_mean": sum(rho) / len(rho),
            "widths_fp32": widths["fp32"], "widths_bf16": widths["bf16"], "widths_agree": widths["fp32"] == widths["bf16"]}


def mlp_fraction(loaded: Loaded) -> float:
    mlp = sum(p.numel() for i in range(len(loaded.sites)) for m in loaded.mlp_modules(i).values()
              for p in m.parameters())
    return mlp / count_params(loaded.model)


def _variants(spec, device, validation: int, calibration: int) -> tuple[dict[str, Loaded], str]:
    """original, pruned (budget search: ~40% of MLP neurons removed) and the same widths aligned to 64."""
    base = _model(spec, device)
    data = _data(base, calibration, validation)
    scores = _score(base, data.calibration.batches(32), device, autocast=device.type == "cuda",
                    checkpointing=device.type == "cuda")
    loss = _search_loss(base)
    target = int((1 - 0.4 * mlp_fraction(base)) * count_params(base.model))

    def run(m: Loaded, t: float):
        return adaptive_widths(m, scores, data.validation, loss=loss, threshold=t, batch_size=32, device=device,
                               autocast=device.type == "cuda")

    pruned, res, threshold, _ = budget_widths(lambda: copy.deepcopy(base), target, run, rounds=4,
                                              tolerance=int(0.02 * count_params(base.model)))
    widths, source = res.widths, f"adaptive search, budget {target / count_params(base.model):.3f}, threshold {threshold:.3g}"
    removed = 1 - sum(widths) / sum(base.widths())
    if abs(removed - 0.4) > 0.1:  # a random-init model's entropy can be flat: say so, time a 40% cut anyway
        widths = uniform_widths(base.widths(), 0.6, 1)
        source = f"uniform 60% kept (the budget search removed {removed:.0%}, too far from 40%)"
        pruned = copy.deepcopy(base)
        apply_widths(pruned, scores, widths)
    aligned = copy.deepcopy(base)
    apply_widths(aligned, scores, [min(width_grid(h, 64), key=lambda w: (abs(w - k), -w))
                                   for h, k in zip(base.widths(), widths)])
    return {"original": base, "pruned": pruned, "aligned64": aligned}, source


def section_latency(check: Check, models: dict, device: torch.device, smoke: bool, batches: list[int],
                    validation: int, compile_needs_s: float, record: dict) -> None:
    """Eager rows for ViT-L then ViT-g; torch.compile rows for ViT-L only, when the time left allows."""
    for key in ("large", "giant"):
        variants, source = _variants(models[key], device, validation, max(64, validation))
        size = variants["original"].input_size
        flops = {k: count_flops(v.model, size) for k, v in variants.items()}
        removed = 1 - sum(variants["pruned"].widths()) / sum(variants["original"].widths())
        rows: list[dict] = []
        record[key] = {"model": models[key][0], "mlp_removed": removed, "widths_from": source, "flops": flops,
                       "widths": {k: v.widths() for k, v in variants.items()}, "rows": rows}
        rows += _latency_rows(variants, "eager", device, batches, flops)
        check.save()
        if key == "large" and not smoke:
            if check.left() < compile_needs_s:
                rows.append({"mode": "compile", "status": f"not run (time): {check.left():.0f} s left, compile "
                                                          f"rows need about {compile_needs_s:.0f} s"})
            else:
                rows += _latency_rows(variants, "compile", device, batches, flops)
            check.save()
        del variants
        _peak_reset(device)


def _compiled(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[], int]]:
    """torch.compile with a fresh Dynamo state (each variant its own cache and recompile budget), and
    a probe: how many graphs Dynamo compiled since (0: the model ran eager, whatever it is called)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, dynamic=True), lambda: int(counters["stats"]["unique_graphs"])


def _latency_rows(variants: dict, mode: str, device, batches: list[int], flops: dict) -> list[dict]:
    from amp_deploy.deploy.runtimes import Runner

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for b in batches:
        x = torch.randn(b, *variants["original"].input_size, device=device, dtype=dtype)
        runners, graphs = {}, {}
        for k, v in variants.items():
            m = copy.deepcopy(v.model).to(device, dtype).eval()
            if mode == "compile":
                m, graphs[k] = _compiled(m)
                with torch.inference_mode():
                    m(x)  # compile now, for this batch size, before any timing

            @torch.inference_mode()
            def run(x, m=m):
                return m(x)

            runners[k] = Runner(run, sync=(torch.cuda.synchronize if device.type == "cuda" else None),
                                events=device.type == "cuda")
        st = latency(runners, x, 3 if device.type == "cpu" else 10, 5 if device.type == "cpu" else 30, 0.0)
        for k in ("pruned", "aligned64"):
            compiled = mode != "compile" or (graphs[k]() > 0 and graphs["original"]() > 0)
            speed = st["original"]["p50"] / st[k]["p50"]
            dev = [st[n].get("device", {}).get("p50") for n in ("original", k)]
            rows.append({"mode": mode if compiled else "compile (fell back to eager: no graph ran)", "batch": b,
                         "variant": k, "p50_ms": [st["original"]["p50"], st[k]["p50"]], "device_p50_ms": dev,
                         "images_per_s": [st["original"]["throughput"], st[k]["throughput"]], "speedup": speed,
                         "flop_speedup": flops["original"] / flops[k],
                         "realised_over_flop": speed / (flops["original"] / flops[k])})
        del runners
    return rows


# --- output ----------------------------------------------------------------------------------------


SHARDED = {"full": ("vit_large_patch14_dinov2", {"img_size": 224}), "smoke": ("vit_large_patch14_dinov2",
            {"img_size": 28, "depth": 2, "embed_dim": 64, "num_heads": 2})}


def sharded_worker(out: str, smoke: bool, precision: str) -> None:
    """One rank of the sharded section (launched by torchrun): distil, then rank 0 writes the figures and
    the gathered student to `out` (.json, .safetensors)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from amp_deploy.prune.distill import distill

    cuda = not smoke
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        spec = SHARDED["smoke" if smoke else "full"]
        teacher = _model(spec, torch.device("cpu"), seed=0)
        student = _model(spec, torch.device("cpu"), seed=0)
        data = _data(student, 32 if smoke else 256, 1)
        with torch.no_grad():
            scores = [torch.rand(w, generator=torch.Generator().manual_seed(i)) for i, w in enumerate(student.widths())]
        apply_widths(student, scores, [int(w * 0.6) for w in student.widths()])
        _peak_reset(device)
        t0 = time.perf_counter()
        state = distill(student.model, teacher.model, data.calibration, epochs=1, lr=1e-4,
                        batch_size=8 if smoke else 32, warmup=0.1, weight_decay=0.05, loss="cosine", seed=0,
                        device=device, sharding="fsdp", blocks=student.blocks, checkpointing=True, precision=precision)
        _sync(device)
        seconds = time.perf_counter() - t0
        peak = torch.tensor([float(_peak(device) or 0)], device=device)
        peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
        dist.all_gather(peaks, peak)
        if dist.get_rank() == 0:
            steps = -(-len(data.calibration) // (8 if smoke else 32))
            save_file({k: v.contiguous() for k, v in state.student.items()}, out + ".safetensors")
            Path(out + ".json").write_text(json.dumps({
                "processes": dist.get_world_size(), "precision": precision, "model": spec[0],
                "student_params": sum(v.numel() for v in state.student.values()), "steps": steps,
                "seconds": round(seconds, 2), "steps_per_s": round(steps / seconds, 3),
                "peak_bytes_per_rank": [int(p.item()) for p in peaks], "losses": state.losses}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker_error(res: subprocess.CompletedProcess) -> str:
    """The failed rank's own last error line (torchrun's summary ends in a row of '=' that says nothing)."""
    lines = [ln.split("]:", 1)[-1].strip() for ln in (res.stderr or res.stdout or "").splitlines()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (errors or [ln for ln in lines if ln.strip("= ")] or ["no output"])[-1][:300]


def section_sharded(device: torch.device, smoke: bool, record: dict) -> dict:
    """FSDP2 distillation through torchrun (NCCL on CUDA, gloo in the smoke): 1 process, then every GPU
    (the smoke: 2 processes), fp32 (compared with 1 process) and bf16."""
    import tempfile

    from safetensors.torch import load_file

    n = 2 if smoke else torch.cuda.device_count()
    runs = [(1, "fp32"), *([(n, "fp32")] if n > 1 else []), (n, "bf16")]
    record["runs"] = []
    if n == 1:
        record["several_gpus"] = "not run: this machine has one GPU"
    with tempfile.TemporaryDirectory() as tmp:
        for procs, precision in runs:
            out = str(Path(tmp) / f"p{procs}-{precision}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   str(Path(__file__).resolve()), "--sharded-worker", out, "--precision", precision,
                   *(["--cpu-smoke"] if smoke else [])]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode != 0:
                raise RuntimeError(f"torchrun {procs} x {precision}: exit {res.returncode}: {_worker_error(res)}")
            row = json.loads(Path(out + ".json").read_text())
            if procs > 1 and precision == "fp32":
                a, b = load_file(str(Path(tmp) / "p1-fp32.safetensors")), load_file(out + ".safetensors")
                row["max_abs_diff_to_1_process"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
            record["runs"].append(row)
    return {}


def render(result: dict) -> str:
    lines = [f"# gpu_check: {result['device']} ({result['date']})", "",
             f"{'CPU smoke run: these are CPU figures of tiny models, not GPU figures.' if result['smoke'] else ''}", "",
             "| section | status | seconds | note |", "|---|---|---:|---|"]
    for name, s in result["sections"].items():
        note = s.get("reason") or s.get("summary") or ""
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {str(note)[:160]} |")
    sc = result["sections"].get("scale", {})
    if sc.get("status") == "ok":
        lines += ["", f"AMP at scale: {sc['model']}, {sc['params']:,} parameters, images {sc['images']}", "",
                  "| | seconds | peak GPU bytes | block forwards |", "|---|---:|---:|---:|",
                  f"| score (bf16, checkpointing) | {sc['score']['seconds']} | {sc['score']['peak_bytes']} | |",
                  f"| search, cached | {sc['search_cached']['seconds']} | {sc['search_cached']['peak_bytes']} | "
                  f"{sc['search_cached']['block_forwards']} |",
                  f"| search, reference scheme | {sc['search_naive']['seconds']} | {sc['search_naive']['peak_bytes']} | "
                  f"{sc['search_naive']['block_forwards']} |", "",
                  f"Scoring {sc['score']['images_per_s']} images/s; same widths both ways: {sc['search_same_widths']}; "
                  f"largest calibration batch that fits: {sc['largest_calibration_batch']['largest_fitting']}."]
    bf = result["sections"].get("bf16", {})
    if bf.get("status") == "ok":
        lines += ["", f"bf16 vs fp32 scores ({bf['model']}): Spearman min {bf['spearman_min']:.4f}, mean "
                  f"{bf['spearman_mean']:.4f}; widths agree: {bf['widths_agree']}."]
    la = result["sections"].get("latency", {})
    for m in la.values():  # rows measured before a failure or the deadline are shown too
        if not isinstance(m, dict) or "rows" not in m:
            continue
        lines += ["", f"Latency {m['model']} ({m['mlp_removed']:.0%} of MLP neurons removed; widths: {m['widths_from']})", "",
                  "| mode | batch | variant | p50 ms original -> pruned (host) | device p50 ms | images/s | speedup | "
                  "FLOP speedup | realised/FLOP |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            if "status" in r:
                lines.append(f"| {r['mode']} | | | {r['status']} | | | | | |")
                continue
            dev = r.get("device_p50_ms") or [None, None]
            dev_s = f"{dev[0]:.3f} -> {dev[1]:.3f}" if None not in dev else "n/a"
            lines.append(f"| {r['mode']} | {r['batch']} | {r['variant']} | {r['p50_ms'][0]:.3f} -> {r['p50_ms'][1]:.3f} | "
                         f"{dev_s} | {r['images_per_s'][0]:.0f} -> {r['images_per_s'][1]:.0f} | {r['speedup']:.2f}x | "
                         f"{r['flop_speedup']:.2f}x | {r['realised_over_flop']:.2f} |")
    sh = result["sections"].get("sharded", {})
    if sh.get("runs"):
        lines += ["", "Sharded distillation (FSDP2, activation checkpointing, 1 epoch)", "",
                  "| processes | precision | student params | steps/s | peak bytes per rank | max abs diff to 1 process |",
                  "|---:|---|---:|---:|---|---:|"]
        for r in sh["runs"]:
            lines.append(f"| {r['processes']} | {r['precision']} | {r['student_params']:,} | {r['steps_per_s']} | "
                         f"{r['peak_bytes_per_rank']} | {r.get('max_abs_diff_to_1_process', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: proves the script, not a GPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "out" / "gpu_check"),
                    help="folder for gpu_check.json, gpu_check.md and quickstart_report.json (default: $OUT)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check: a section that would "
                                                                 "not fit the time left is recorded 'not run (time)'")
    ap.add_argument("--sharded-worker", default=None, help=argparse.SUPPRESS)  # one rank of the sharded section
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if args.sharded_worker:
        sharded_worker(args.sharded_worker, smoke, args.precision)
        return {}
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or use --cpu-smoke")
    device = torch.device("cpu" if smoke else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = SMOKE if smoke else FULL
    name = "CPU (smoke)" if smoke else torch.cuda.get_device_name()
    result = {"device": name, "date": time.strftime("%Y-%m-%d"), "smoke": smoke, "torch": torch.__version__,
              "host": os.uname().nodename, "budget_s": args.budget}

    def save() -> None:  # after every section: a check cut short still leaves its figures
        result.update(seconds=round(check.elapsed(), 1), sections=check.sections)
        write_text(out / "gpu_check.json", json.dumps(result, indent=2, default=str))
        write_text(out / "gpu_check.md", render(result))

    check = Check(args.budget, save)
    cal, val = (16, 8) if smoke else (256, 128)
    # the figures that matter most first: AMP at scale, then latency, bf16, the quickstart, the GPU tests
    check.run("scale", lambda r: section_scale(models, device, smoke, cal, val, r), estimate_s=0 if smoke else 120)
    check.run("latency", lambda r: section_latency(check, models, device, smoke, [1, 2] if smoke else [1, 32, 128],
                                                   8 if smoke else 32, 0 if smoke else 150, r),
              estimate_s=0 if smoke else 150)
    check.run("bf16", lambda r: section_bf16(models, device, cal, val, r), estimate_s=0 if smoke else 40)
    check.run("sharded", lambda r: section_sharded(device, smoke, r), estimate_s=0 if smoke else 90)
    check.run("quickstart", lambda r: section_quickstart(device, out, r), skip="--cpu-smoke" if smoke else None,
              estimate_s=60)
    check.run("pytest", section_pytest, skip="--cpu-smoke (the suite itself runs this script)" if smoke else None,
              estimate_s=120)
    save()
    print((out / "gpu_check.md").read_text(), flush=True)
    return result



if __name__ == "__main__":
    main()
