"""Issue 38 (trust, round two): each finding reproduced on the quickstart recipe, then fixed."""

import json

from tests.conftest import FAST, QUICKSTART, build, read_search

Q = [QUICKSTART, "runtimes=[onnxruntime]", "validate.iterations=2", "validate.warmup=1"]


def test_a_parameter_budget_with_heads_is_kept_or_refused(tmp_path):
    """Finding 1: prune.heads with a budget below the MLP-only floor exited 0 with 0.350 of the
    parameters: the uniform check (every head kept) was chosen though it did not fit."""
    from tests.conftest import tiny_recipe

    out = tmp_path / "out"  # the quickstart's finding, on a smaller model (the same code path, a fraction of the time)
    recipe = tiny_recipe(tmp_path, prune={"threshold": 0.05, "steps": 3, "heads": True, "target_params": 0.13})
    res = build(recipe, "--out", out)
    assert "Traceback" not in res.output
    if res.exit_code == 0:
        rep = json.loads((out / "report.json").read_text())
        assert rep["params"]["pruned"] <= 0.13 * rep["params"]["original"] + 1, rep["params"]
        check = read_search(out).get("uniform_check")
        assert check is None or check["chosen"] == "adaptive" or check["fits"]
    else:
        assert res.exit_code == 2 and "prune.target_params" in res.output, res.output
        assert not (out / "pruned.safetensors").exists()
    assert "keeps every attention head" in res.output or res.exit_code == 2


def test_the_uniform_check_says_it_keeps_every_head(tmp_path):
    from tests.conftest import tiny_recipe

    out = tmp_path / "out"
    recipe = tiny_recipe(tmp_path, prune={"threshold": 0.05, "steps": 3, "heads": True, "target_params": 0.6})
    res = build(recipe, "--out", out)
    assert res.exit_code == 0, res.output
    assert "keeps every attention head" in res.output
    search = read_search(out)
    rep = json.loads((out / "report.json").read_text())
    assert rep["params"]["pruned"] <= 0.6 * rep["params"]["original"] + 1
    assert search["uniform_check"]["heads"] == "all"


def _timed(src, dst, rounds: int, slower: float = 1.0, noise: float = 0.05, seed: int = 0, batches=("1", "8")):
    """A copy of a report whose runtime rows hold `rounds` synthetic timed rounds (lognormal `noise`),
    the pruned model `slower` times slower; batch sizes outside `batches` dropped."""
    import numpy as np

    rep = json.loads((src / "report.json").read_text())
    rng = np.random.default_rng(seed)
    lat = rep["runtimes"]["onnxruntime"]["latency_ms"]
    for model in ("original", "pruned"):
        for b in list(lat[model]):
            if b not in batches:
                del lat[model][b]
                continue
            scale = slower if model == "pruned" else 1.0
            lat[model][b]["samples"] = list(lat[model][b]["p50"] * scale * rng.lognormal(0.0, noise, rounds))
            lat[model][b]["p50"] *= scale
    dst.mkdir()
    (dst / "report.json").write_text(json.dumps(rep))
    return dst


def test_the_gate_fails_a_2p_slowdown_passes_none_and_cannot_judge_between(quickstart, tmp_path):
    """Finding 2: a 10% slowdown whose interval lay wholly above a 5% gate exited 0. One rule on the
    interval: above the gate fails (1), below passes (0), holding it cannot judge (3, rounds named)."""
    from typer.testing import CliRunner

    from amp_deploy.cli import app

    run = CliRunner().invoke
    src = quickstart[0]
    a = _timed(src, tmp_path / "a", 200)
    same = _timed(src, tmp_path / "same", 200, seed=1)
    slow = _timed(src, tmp_path / "slow", 200, slower=1.10, seed=2)
    res = run(app, ["compare", str(a), str(slow), "--fail-on-regression", "5"])
    assert res.exit_code == 1 and "slower by more than 5%" in res.output, res.output
    res = run(app, ["compare", str(a), str(same), "--fail-on-regression", "5"])
    assert res.exit_code == 0, res.output
    noisy_a = _timed(src, tmp_path / "na", 30, noise=0.3, seed=3)
    noisy_b = _timed(src, tmp_path / "nb", 30, slower=1.10, noise=0.3, seed=4)
    res = run(app, ["compare", str(noisy_a), str(noisy_b), "--fail-on-regression", "5"])
    assert res.exit_code == 3 and "would resolve it" in res.output, res.output


def test_a_batch_measured_in_a_only_cannot_pass(quickstart, tmp_path):
    """Finding 3: B measured batch 1 only, A batches 1 and 8: exit 0 and batch 8 never named."""
    from typer.testing import CliRunner

    from amp_deploy.cli import app

    a = _timed(quickstart[0], tmp_path / "a", 200)
    b = _timed(quickstart[0], tmp_path / "b", 200, seed=1, batches=("1",))
    res = CliRunner().invoke(app, ["compare", str(a), str(b), "--fail-on-regression", "5"])
    assert res.exit_code == 3 and "batch 8" in res.output, res.output


def _cli(out, *extra, env=None):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "amp_deploy.cli", "build", str(QUICKSTART), "--out", str(out), *FAST,
           "runtimes=[onnxruntime]", "distill.sharding=fsdp", "distill.batch_size=128", "distill.lr=3e-4",
           "distill.epochs=3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_a_sharded_checkpoint_killed_between_its_renames_or_damaged(tmp_path):
    """Finding 6: a kill between the two renames of the sharded checkpoint swept both copies (the
    distillation restarted from epoch 0); a damaged distill.ckpt.dcp ended in an 88-line traceback
    (torch.distributed.checkpoint's CheckpointException is a BaseException)."""
    import shutil
    import signal

    out = tmp_path / "out"
    killed = _cli(out, env={"AMP_DEPLOY_KILL_BEFORE": ".distill.ckpt.dcp.previous@2"})  # saving epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "distill.ckpt.dcp").exists() and (out / ".distill.ckpt.dcp.previous").is_dir()
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged, ignore=shutil.ignore_patterns(".lock"))
    again = _cli(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "distill: resuming after epoch 1 of 3" in again.stderr
    assert not (out / "distill.ckpt.dcp").exists() and not (out / ".distill.ckpt.dcp.previous").exists()
    (damaged / ".distill.ckpt.dcp.previous").rename(damaged / "distill.ckpt.dcp")
    for f in (damaged / "distill.ckpt.dcp").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:64])
    res = _cli(damaged)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "cannot be read" in res.stderr and "rm -r" in res.stderr


def test_edited_checkpoint_metadata_is_one_line(quickstart, tmp_path):
    """Finding 8: inspect and load_pruned on edited metadata ended in IndexError / JSONDecodeError
    tracebacks, a raw torch error, or exit 0 with "4 of 1" heads; widths and shapes could disagree."""
    import pytest
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from amp_deploy import load_pruned
    from amp_deploy.cli import app
    from amp_deploy.errors import UserError
    from tests.conftest import assert_one_line_error

    src = quickstart[0] / "pruned.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    shapes = json.loads(meta["shapes"])
    original = json.loads(meta["original_shapes"])
    edits = {
        "width above the base model's": {"shapes": json.dumps([[10_000, h] for _, h in shapes])},
        "shapes not JSON": {"shapes": "[[1, 2"},
        "more shapes than blocks": {"shapes": json.dumps(shapes + shapes[:1])},
        "original heads below pruned": {"shapes": json.dumps([[w, 4] for w, _ in shapes]),
                                        "original_shapes": json.dumps([[w, 1] for w, _ in original])},
        "negative heads": {"shapes": json.dumps([[w, -1] for w, _ in shapes])},
        "heads above the base": {"shapes": json.dumps([[w, 9] for w, _ in shapes])},
        "widths disagree": {"widths": json.dumps([w + 1 for w, _ in shapes])},
    }
    for what, change in edits.items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path), metadata={**meta, **change})
        res = CliRunner().invoke(app, ["inspect", str(path)])
        assert_one_line_error(res, path.name)
        with pytest.raises(UserError, match="metadata"):
            load_pruned(path)


def test_a_requested_runtime_that_fails_fails_the_build(quickstart, tmp_path):
    """Finding 4: a damaged model file left validate done, exit 0, and a row "failed: RuntimeError:
    Exception from src/inference/src/cpp/core.cpp:84:" that said nothing of what was wrong."""
    import shutil

    from typer.testing import CliRunner

    from amp_deploy.cli import app
    from amp_deploy.errors import first_line

    out = tmp_path / "out"
    shutil.copytree(quickstart[0], out, ignore=shutil.ignore_patterns(".lock"))
    onnx_file = out / "pruned.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:200])
    res = CliRunner().invoke(app, ["validate", str(out)])
    assert res.exit_code == 1, res.output
    assert "runtime 'onnxruntime' failed" in res.output and "pruned.onnx" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["runtimes"]["onnxruntime"]["status"] == "failed"
    import yaml

    doc = yaml.safe_load((out / "recipe.yaml").read_text())
    doc.setdefault("validate", {})["may_fail"] = ["onnxruntime"]
    (out / "recipe.yaml").write_text(yaml.safe_dump(doc))
    res = CliRunner().invoke(app, ["validate", str(out)])
    assert res.exit_code == 0, res.output
    said = RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\nException from src/frontends/common/src/"
                        "frontend.cpp:54:\n[ir_frontend] Model is not valid: pruned.bin is truncated")
    assert first_line(said) == "[ir_frontend] Model is not valid: pruned.bin is truncated"


def test_flops_count_the_attention_products():
    """Finding 11: FlopCounterMode had no formula for SDPA's CPU kernel: attention counted 0 FLOPs
    (a head-pruned quickstart: 2,123,008 reported, 2,319,616 with fused_attn=False)."""
    import copy

    import torch

    from amp_deploy.measure.metrics import count_flops
    from amp_deploy.prune.families import load_timm
    from amp_deploy.prune.rebuild import apply_heads

    loaded = load_timm("test_vit", False, {"depth": 2, "img_size": 32, "num_classes": 10})
    apply_heads(loaded, [torch.rand(h) for h in loaded.heads()], [1] * len(loaded.heads()))
    fused = count_flops(loaded.model, loaded.input_size)
    plain = copy.deepcopy(loaded.model)
    for block in plain.blocks:
        block.attn.fused_attn = False
    assert fused == count_flops(plain, loaded.input_size)


def test_clip_heads_on_transformers_4_are_refused_in_one_line(monkeypatch):
    """Finding 12: head pruning of CLIP and SigLIP towers crashed on transformers 4.x (their attention
    reshapes to embed_dim there): refused with the version that cuts them."""
    import pytest

    from amp_deploy.errors import UserError
    from amp_deploy.pipeline.stages import require_heads
    from amp_deploy.prune import families as F
    from tests.test_families import _load

    monkeypatch.setattr(F, "hf_ragged_self_attn", lambda: False)
    loaded = _load("hf_CLIPVisionModel")
    assert loaded.heads() is None
    with pytest.raises(UserError, match="transformers >= 5"):
        require_heads(loaded)


def test_the_memory_plan_counts_the_images_there_are_and_only_stages_that_run(quickstart, tmp_path):
    """Finding 10: data.batch_size=100000 with 32 images was refused ("needs 42.74 GiB"; the build
    peaked at 0.77 GiB), and stages already done were planned (and refused) though they would be
    skipped; on the CPU the advice named --nproc, which divides the host's memory."""
    import torch

    from amp_deploy.measure.memory_plan import plan_stages
    from amp_deploy.pipeline.context import Context
    from amp_deploy.pipeline.memory import model_shape, recipe_plan
    from amp_deploy.pipeline.run import _pending
    from amp_deploy.pipeline.stages import STAGE_NAMES
    from amp_deploy.recipe import load_recipe
    from tests.conftest import tiny_recipe

    small = load_recipe(tiny_recipe(tmp_path, data={"source": "synthetic", "calibration": 16, "validation": 16,
                                                     "holdout": 8, "batch_size": 8}))
    huge = load_recipe(tiny_recipe(tmp_path, data={"source": "synthetic", "calibration": 16, "validation": 16,
                                                    "holdout": 8, "batch_size": 100000}))
    peak = {p.stage: p.peak for p in recipe_plan(small, "cpu", 1, baseline=0)}
    assert {p.stage: p.peak for p in recipe_plan(huge, "cpu", 1, baseline=0)}["score"] <= 2 * peak["score"]
    res = build(tiny_recipe(tmp_path, data={"source": "synthetic", "calibration": 16, "validation": 16, "holdout": 8,
                                            "batch_size": 100000}), "--out", tmp_path / "huge")
    assert res.exit_code == 0, res.output
    out = quickstart[0]
    ctx = Context.create(load_recipe(out / "recipe.yaml"), out, torch.device("cpu"))
    assert _pending(ctx, STAGE_NAMES) == []  # a finished build plans (and refuses) nothing
    plans = plan_stages(model_shape(small), device="cpu", processes=1, baseline=0, widths=None, score_batch=8,
                        checkpointing=False, validation=16, holdout=8, search_batch=8, distill=None,
                        workspace_mib=None, validate_batch=8, cpu_sessions=1)
    assert not any("--nproc" in p.fix for p in plans)


def test_settings_that_change_nothing_rerun_nothing(tmp_path):
    """Finding 13: prune.latency.* without a latency budget and prune.checkpointing re-ran the search and
    everything after; reordering runtimes re-ran export; `prune OUT --force` with the same widths re-ran
    rebuild, distill, export and validate (safetensors' metadata order, recorded seconds)."""
    from typer.testing import CliRunner

    from amp_deploy.cli import app

    out = tmp_path / "out"
    base = [QUICKSTART, "--out", out, *FAST, "runtimes=[onnxruntime,torch]"]
    assert build(*base).exit_code == 0
    res = build(*base[:-1], "runtimes=[torch,onnxruntime]", "prune.latency.iterations=7", "prune.checkpointing=true")
    assert res.exit_code == 0, res.output
    for stage in ("score", "search", "rebuild", "export", "validate"):
        assert f"{stage}: inputs unchanged, skipped" in res.output, (stage, res.output)
    res = CliRunner().invoke(app, ["prune", str(out), "--force"])
    assert res.exit_code == 0, res.output
    res = build(*base)
    assert res.exit_code == 0, res.output
    for stage in ("export", "validate"):
        assert f"{stage}: inputs unchanged, skipped" in res.output, (stage, res.output)


def test_the_compensation_settings_are_in_the_search_and_rebuild_keys(tmp_path):
    """prune.compensate (and its damping) change what the search prices and what the rebuild writes: both
    re-run, the scores stay."""
    from tests.conftest import tiny_recipe

    out = tmp_path / "out"
    recipe = tiny_recipe(tmp_path)
    assert build(recipe, "--out", out).exit_code == 0
    for change in ("prune.compensate=bias", "prune.compensate_damping=0.1"):
        res = build(recipe, "--out", out, change)
        assert res.exit_code == 0, res.output
        assert "score: inputs unchanged, skipped" in res.output
        assert "search: done" in res.output and "rebuild: done" in res.output, res.output
    assert json.loads((out / "compensate.json").read_text())["damping"] == 0.1
