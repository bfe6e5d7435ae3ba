"""The command line as a user meets it: the quickstart build, resume, and bad input."""

import json
import shutil

import yaml
from typer.testing import CliRunner

from amp_deploy.cli import app

from .conftest import FAST, QUICKSTART, assert_one_line_error
from .conftest import build as _build

runner = CliRunner()


def test_quickstart_meets_the_acceptance_figures(quickstart):
    out, output = quickstart
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == "amp-deploy.report/1"
    assert rep["params"]["pruned"] <= 0.65 * rep["params"]["original"]
    assert rep["flops"]["pruned"] < rep["flops"]["original"]
    fid = rep["fidelity"]
    assert fid["accuracy_original"] >= 96.0
    assert fid["accuracy_pruned"] >= fid["accuracy_original"] - 1.0
    ort = rep["runtimes"]["onnxruntime"]
    assert ort["status"] == "ok" and ort["settings"]["providers"][0] == "CPUExecutionProvider"
    assert ort["parity"]["pruned"]["max_abs_err"] <= 1e-4
    assert ort["parity"]["pruned"]["cosine_min"] >= 0.99999
    assert set(ort["latency_ms"]["original"]) == set(ort["latency_ms"]["pruned"]) == {"1", "8"}
    assert ort["latency_ms"]["pruned"]["8"]["p50"] > 0
    trt = rep["runtimes"]["tensorrt"]
    assert trt["status"] == "skipped" and trt["reason"]
    assert len(rep["widths"]["pruned"]) == len(rep["widths"]["original"]) == 4
    assert rep["widths"]["pruned"] != rep["widths"]["original"]  # ragged, adaptive
    assert 0 < rep["prune"]["block_forwards"] < rep["prune"]["block_forwards_naive"]
    for key in ("cosine_mean", "cosine_min", "top1_agreement"):
        assert 0 < fid[key] <= 1.0 + 1e-6
    assert "report:" in output and "parameters" in output
    for f in ("recipe.yaml", "manifest.json", "scores.safetensors", "pruned.safetensors", "original.onnx",
              "pruned.onnx", "report.json", "report.md"):
        assert (out / f).is_file(), f
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    for name, entry in stages.items():  # the test runner's process: over 100 MiB with torch, under 24 GiB
        assert 100 < entry["peak_rss_mib"] < 24 * 1024 and entry["peak_cuda_mib"] is None, name
        assert entry["peak_rss_since"] == "stage" and f"{name}: done in" in output
    assert "peak memory" in output


def test_resolved_recipe_is_saved_with_overrides(quickstart):
    out, _ = quickstart
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["validate"]["iterations"] == 5


def test_rerun_skips_finished_stages_and_a_validate_change_reruns_only_validate(quickstart, tmp_path):
    out, _ = quickstart
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    res = _build(QUICKSTART, "--out", copy, *FAST)
    assert res.exit_code == 0 and res.output.count("skipped") >= 6, res.output
    before = json.loads((copy / "manifest.json").read_text())["stages"]
    res = _build(QUICKSTART, "--out", copy, "validate.iterations=6", "validate.warmup=2")
    assert res.exit_code == 0, res.output
    after = json.loads((copy / "manifest.json").read_text())["stages"]
    for stage in ("score", "search", "rebuild", "export", "compile"):
        assert after[stage]["finished"] == before[stage]["finished"] and f"{stage}: inputs unchanged" in res.output
    assert "validate: done" in res.output
    rep = json.loads((copy / "report.json").read_text())
    assert rep["runtimes"]["onnxruntime"]["latency_ms"]["pruned"]["1"]["iterations"] == 6


def test_inspect_shows_widths(quickstart):
    out, _ = quickstart
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    widths = json.loads((out / "report.json").read_text())["widths"]["pruned"]
    assert all(str(w) in res.output for w in widths) and "parameters" in res.output


def test_unknown_key_exits_2_with_one_line(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(QUICKSTART.read_text().replace("  steps: 6", "  stepz: 6"))
    assert_one_line_error(_build(r, "--out", tmp_path / "o"), "prune.stepz: unknown key")
    assert not (tmp_path / "o").exists()


def test_wrong_type_exits_2(tmp_path):
    assert_one_line_error(_build(QUICKSTART, "--out", tmp_path / "o", "prune.threshold=abc"), "prune.threshold")


def test_missing_weights_exits_2(tmp_path):
    assert_one_line_error(_build(QUICKSTART, "--out", tmp_path / "o", "model.pretrained=nope.safetensors"),
                    "weights file not found")


def test_unknown_model_name_suggests_close_matches(tmp_path):
    assert_one_line_error(_build(QUICKSTART, "--out", tmp_path / "o", "model.name=vit_tiny_patch16_22"),
                    "did you mean vit_tiny_patch16_224")


def test_check_lists_every_problem(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: t\nmodel: {name: test_vit, colour: red}\nprune: {steps: '6'}\n")
    res = runner.invoke(app, ["check", str(r)])
    assert res.exit_code == 2 and "model.colour" in res.output and "prune.steps" in res.output
    assert runner.invoke(app, ["check", str(QUICKSTART)]).exit_code == 0


def test_check_also_runs_the_preflight(tmp_path):
    res = runner.invoke(app, ["check", str(QUICKSTART), "model.name=vit_tiny_patch16_22", "data.holdout=999"])
    assert res.exit_code == 2 and "did you mean vit_tiny_patch16_224" in res.output


def test_bad_name_and_too_many_digits_fail_before_anything_is_written(tmp_path):
    assert_one_line_error(_build(QUICKSTART, "--out", tmp_path / "o", "name=../x"), "name: String should match pattern")
    assert_one_line_error(_build(QUICKSTART, "--out", tmp_path / "o", "data.holdout=1000"), "digits test split has 360")
    assert not (tmp_path / "o").exists()


def test_version():
    from amp_deploy import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
