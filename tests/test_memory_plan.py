"""The memory plan (issue 29, item 2): printed by `check`, refused before any work where a stage does not
fit, recorded in the manifest beside each stage's measured peak, and close to that peak on the CPU."""

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from amp_deploy.cli import app
from amp_deploy.measure.memory_plan import ModelShape, block_activations, plan_stages

from .conftest import REPO, tiny_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A flat folder with enough image files for the paper recipes' data sections (links to one PNG)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (8, 8)).save(folder / "0.png")
    for i in range(1, 3600):
        (folder / f"{i}.png").symlink_to(folder / "0.png")
    return folder


def test_the_bige_recipe_is_planned_for_8_gpus_of_80_gb_and_refused_unsharded(image_folder):
    recipe = REPO / "recipes" / "eva02_e14_plus.yaml"
    res = runner.invoke(app, ["check", str(recipe), f"data.path={image_folder}"])
    assert res.exit_code == 0, res.output
    assert "8 x 80 GiB cuda" in res.output and "sharded over 8 processes (FSDP2)" in res.output
    for stage in ("score", "search", "distill", "export", "compile", "validate"):
        assert f"│ {stage}" in res.output
    res = runner.invoke(app, ["check", str(recipe), f"data.path={image_folder}", "distill.sharding=none"])
    assert res.exit_code == 2
    line = [ln for ln in res.output.splitlines() if "memory plan: stage" in ln]
    assert len(line) == 1 and "stage 'distill'" in line[0] and "unsharded" in line[0]
    assert "change distill.sharding: fsdp" in line[0]


def test_sharding_divides_the_student_and_checkpointing_the_activations():
    shape = ModelShape(params=4_000_000_000, dim=1792, widths=(15360,) * 64, neuron_params=(3585,) * 64,
                       block_params=68_000_000, tokens=257, image_values=3 * 224 * 224, heads=16)
    common = dict(device="cuda", baseline=0, score_batch=32, checkpointing=True, validation=512, holdout=1024,
                  search_batch=32, workspace_mib=None, validate_batch=32, cpu_sessions=0)
    d = {"batch": 64, "checkpointing": True, "bf16": True}
    one = {p.stage: p for p in plan_stages(shape, processes=8, distill={**d, "sharding": "none"}, **common)}
    eight = {p.stage: p for p in plan_stages(shape, processes=8, distill={**d, "sharding": "fsdp"}, **common)}
    state = "student, gradients, AdamW"
    assert one["distill"].terms[state] == 16 * shape.params
    assert eight["distill"].terms[state] < one["distill"].terms[state] / 7
    kept = block_activations(shape, shape.widths, 8, 2, checkpointing=True)
    assert kept < block_activations(shape, shape.widths, 8, 2, checkpointing=False) / 4


def test_a_build_whose_plan_does_not_fit_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("amp_deploy.pipeline.memory.device_memory", lambda device: 64 << 20)  # a 64 MiB host
    out = tmp_path / "out"
    res = runner.invoke(app, ["build", str(tiny_recipe(tmp_path)), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    line = [ln for ln in res.output.splitlines() if "memory plan: stage" in ln]
    assert len(line) == 1 and "stage 'score'" in line[0] and "change prune.checkpointing" in line[0]
    assert not out.exists()


ONE_STAGE = """
import sys
from amp_deploy.errors import GateFailed
from amp_deploy.pipeline.context import Context
from amp_deploy.pipeline.run import run_stages
from amp_deploy.recipe import load_recipe
try:
    run_stages(Context.create(load_recipe(sys.argv[1]), sys.argv[2], "cpu"), [sys.argv[3]])
except GateFailed:
    pass
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
def test_the_planned_peak_is_within_a_quarter_of_the_measured_one(tmp_path, name):
    """Each stage in a process of its own (as the plan plans it): the manifest's measured peak (resident
    memory since the stage began) and the plan recorded beside it agree within 25%."""
    doc = {"name": "plan", "model": {"source": "timm", "name": name, "kwargs": {"depth": 4, "num_classes": 0}},
           "data": {"source": "synthetic", "calibration": 32, "validation": 32, "holdout": 16, "batch_size": 16,
                    "workers": 0},
           "prune": {"threshold": 0.05, "steps": 1},
           "distill": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "warmup": 0.0},
           "export": {"batch": {"min": 1, "opt": 8, "max": 16}},
           "runtimes": ["onnxruntime"], "validate": {"batch_sizes": [16], "warmup": 1, "iterations": 1}}
    path, out = tmp_path / "plan.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(doc))
    for stage in ("score", "search", "rebuild", "distill", "export", "quantize", "compile", "validate"):
        res = subprocess.run([sys.executable, "-c", ONE_STAGE, str(path), str(out), stage], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    for stage in ("score", "search", "distill", "export", "validate"):
        measured, planned = stages[stage]["peak_rss_mib"], stages[stage]["planned_peak_mib"]
        assert 0.75 <= planned / measured <= 1.25, (stage, planned, measured, stages[stage]["planned_terms_mib"])


def test_where_the_machine_s_memory_is_unknown_the_plan_says_it_was_not_judged(monkeypatch):
    """A host without /proc/meminfo (not Linux): check prints the plan and says it judged nothing;
    it never passes a plan it could not judge silently, and never fails on the unknown figure."""
    from amp_deploy.pipeline import memory

    real = memory.proc_kib
    monkeypatch.setattr(memory, "proc_kib", lambda path, field: None if path == "/proc/meminfo" else real(path, field))
    assert memory.device_capacity("cpu") is None
    res = runner.invoke(app, ["check", str(REPO / "recipes" / "quickstart.yaml")])
    assert res.exit_code == 0, res.output
    assert "its available memory unknown" in res.output and "memory plan: not judged" in res.output
