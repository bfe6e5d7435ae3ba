"""Issue 38 (trust, round two): each finding reproduced on the quickstart recipe, then fixed."""

import json

from tests.conftest import FAST, QUICKSTART, build, read_search

Q = [QUICKSTART, "runtimes=[onnxruntime]", "validate.iterations=2", "validate.warmup=1"]


def test_a_parameter_budget_with_heads_is_kept_or_refused(tmp_path):
    """Finding 1: prune.heads with a budget below the MLP-only floor exited 0 with 0.350 of the
    parameters: the uniform check (every head kept) was chosen though it did not fit."""
    out = tmp_path / "out"
    res = build(*Q, "prune.heads=true", "prune.target_params=0.13", "--out", out)
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
    out = tmp_path / "out"
    res = build(*Q, "prune.heads=true", "prune.target_params=0.6", "--out", out, *FAST)
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
