"""Builds a user can trust (issue 26): stage keys that follow outputs and data, budgets and gates that
never pass silently, and every bad input answered on one line."""

import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from amp_deploy.cli import app
from amp_deploy.errors import UserError
from amp_deploy.pipeline import manifest as M
from amp_deploy.pipeline.folder import BuildFolder
from amp_deploy.pipeline.lock import FolderLock
from amp_deploy.pipeline.stages import STAGES
from amp_deploy.recipe import load_recipe

from .conftest import QUICKSTART, assert_one_line_error, build, tiny_recipe

runner = CliRunner()


def _images(folder: Path, n: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # smooth random fields: images that differ from each other
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(folder / f"img{i:03d}.png")
    return folder


def _folder_recipe(tmp_path: Path, images: Path, **sections) -> Path:
    data = {"source": "folder", "path": str(images), "calibration": 16, "validation": 16, "holdout": 8,
            "batch_size": 8}
    return tiny_recipe(tmp_path, data=data, **sections)


def _refused(res, needle: str) -> str:
    """Exit 2, no traceback, the last line names what is wrong (stages finished before it are kept)."""
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    last = [ln for ln in res.output.splitlines() if ln.strip()][-1]
    assert needle in last and last.startswith("error:"), res.output
    return last


def _ran(output: str) -> list[str]:
    return [s.name for s in STAGES if f"{s.name}: done" in output]


# --- 1-3: keys ----------------------------------------------------------------------------------

def test_an_image_changed_in_place_reruns_score_and_what_it_changed_and_nothing_else_reruns(tmp_path):
    images = _images(tmp_path / "images")
    recipe, out = _folder_recipe(tmp_path, images), tmp_path / "o"
    first = build(recipe, "--out", out)
    assert first.exit_code == 0, first.output
    again = build(recipe, "--out", out)
    assert again.exit_code == 0 and _ran(again.output) == [], again.output  # touching nothing re-runs nothing
    with Image.open(images / "img000.png") as im:  # one image inverted in place (size unchanged)
        inverted = Image.eval(im, lambda v: 255 - v)
    time.sleep(0.01)
    inverted.save(images / "img000.png")
    res = build(recipe, "--out", out)
    assert res.exit_code == 0, res.output
    assert _ran(res.output)[0] == "score"
    # what follows re-ran exactly where its inputs changed: the deployed files belong together
    report = json.loads((out / "report.json").read_text())
    from amp_deploy.checkpoint import read_metadata

    assert report["widths"]["pruned"] == json.loads(read_metadata(out / "pruned.safetensors")["widths"])
    assert "validate" in _ran(res.output)  # the holdout images are part of the report's inputs


def test_a_forced_prune_reruns_every_stage_whose_inputs_it_changed(tmp_path):
    from amp_deploy.checkpoint import load_pruned_model
    from amp_deploy.deploy.runtimes import onnxruntime_runner

    images = _images(tmp_path / "images")
    recipe, out = _folder_recipe(tmp_path, images), tmp_path / "o"
    assert build(recipe, "--out", out).exit_code == 0
    before = (out / "pruned.safetensors").read_bytes()
    # other images under the same names, sizes and mtimes: invisible to the data digest, so only
    # `prune --force` re-scores them (as a re-timed latency search or CUDA scoring can differ)
    for i, p in enumerate(sorted(images.iterdir())):
        st = p.stat()
        rng = np.random.default_rng(1000 + i)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = runner.invoke(app, ["prune", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert (out / "pruned.safetensors").read_bytes() != before  # the checkpoint changed
    res = build(recipe, "--out", out)
    assert res.exit_code == 0, res.output
    ran = _ran(res.output)
    assert "score" not in ran and "export" in ran and "validate" in ran, res.output
    # the deployed ONNX model is the checkpoint, and the report says its widths
    from amp_deploy.checkpoint import read_metadata

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    import torch

    torch_out = load_pruned_model(out / "pruned.safetensors").model.eval()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(onnxruntime_runner(out / "pruned.onnx").run(x), torch_out, atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["widths"]["pruned"] == json.loads(read_metadata(out / "pruned.safetensors")["widths"])


def test_keys_follow_the_files_upstream_stages_wrote(tmp_path):
    recipe = load_recipe(QUICKSTART)
    folder = BuildFolder(tmp_path)
    for p in (folder.scores, folder.search, folder.pruned):
        p.write_bytes(b"x")
    before = M.stage_keys(recipe, STAGES, {}, folder)
    folder.pruned.write_bytes(b"y")  # the checkpoint changed (a forced re-run, another machine's search)
    after = M.stage_keys(recipe, STAGES, {}, folder)
    changed = [s.name for s in STAGES if before[s.name] != after[s.name]]
    assert changed == ["distill", "export", "quantize", "compile", "validate"]


def test_data_folders_and_class_names_are_keyed_by_content_not_by_name(tmp_path):
    images, names = _images(tmp_path / "images", 8), tmp_path / "names.txt"
    names.write_text("a\n")
    doc = {"data": {"source": "folder", "path": str(images), "calibration": 2, "validation": 2, "holdout": 2,
                    "class_names": str(names)}}
    path = tiny_recipe(tmp_path, **doc)
    keys = lambda: M.stage_keys(load_recipe(path), STAGES)["score"]  # noqa: E731
    k0 = keys()
    assert keys() == k0
    names.write_text("b\n")
    k1 = keys()
    assert k1 != k0
    (images / "img000.png").write_bytes((images / "img000.png").read_bytes() + b"\0")
    k2 = keys()
    assert k2 != k1
    (images / "extra.png").write_bytes((images / "img001.png").read_bytes())
    assert keys() != k2


def test_the_latency_search_is_keyed_by_what_its_table_was_timed_with_and_the_device():
    budget = ["prune.target_speedup=1.1", "runtimes=[onnxruntime]"]
    key = lambda *o, device="cpu": M.stage_keys(load_recipe(QUICKSTART, [*budget, *o]), STAGES,  # noqa: E731
                                                device=device)["search"]
    base = key()
    for override in ("export.batch.max=16", "validate.threads=1", "quantize.calibration=8", "compile.workspace_mib=512",
                     "prune.latency.baseline=fp32", "prune.latency.corrections=2"):
        assert key(override) != base, override
    assert key(device="cuda") != base
    plain = lambda *o: M.stage_keys(load_recipe(QUICKSTART, list(o)), STAGES)["search"]  # noqa: E731
    assert plain("validate.threads=1") == plain()  # a threshold search is not timed


def test_the_machine_is_its_cpu_model_not_its_host_name(monkeypatch):
    import platform

    recipe = load_recipe(QUICKSTART)
    here = M.stage_keys(recipe, STAGES)
    monkeypatch.setattr(platform, "node", lambda: "container-1234")
    assert M.stage_keys(recipe, STAGES) == here
    monkeypatch.setattr("amp_deploy.measure.report.cpu_model", lambda: "Another CPU")
    there = M.stage_keys(recipe, STAGES)
    assert there["validate"] != here["validate"] and there["score"] == here["score"]


# --- 4: the lock ----------------------------------------------------------------------------------

def test_a_held_lock_is_never_taken_twice_even_when_its_file_names_a_dead_owner(tmp_path):
    """The race: two processes read the same stale owner; the old lock let both proceed. Here one
    process holds the folder while the file names a dead process: a second may not take it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    code = ("import json, sys, time; from pathlib import Path; from amp_deploy.pipeline.lock import FolderLock\n"
            f"with FolderLock(Path({str(tmp_path)!r})) as lk:\n"
            f"    lk.path.write_text(json.dumps({{'host': None, 'pid': {dead.pid}, 'start': '0'}}))\n"
            "    print('held', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another build"):
            FolderLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path):  # its holder gone: taken
        pass


# --- 5-6: budgets -----------------------------------------------------------------------------------

def test_a_parameter_budget_below_the_smallest_model_is_refused_with_the_reachable_one(tmp_path):
    out = tmp_path / "o"
    res = build(tiny_recipe(tmp_path, prune={"target_params": 0.05, "steps": 2}), "--out", out)
    last = _refused(res, "prune.target_params")  # after the scores (kept), before any search
    assert "out of reach" in last and "prune.target_params >= " in last
    assert not (out / "search.json").exists()


def test_a_budget_met_is_within_it(tmp_path):
    out = tmp_path / "o"
    res = build(tiny_recipe(tmp_path, prune={"target_params": 0.8, "steps": 2}), "--out", out)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["params"]["pruned"] <= int(0.8 * rep["params"]["original"])


def test_the_knapsack_takes_an_aim_at_or_below_1x_and_align_at_the_width_is_refused(tmp_path):
    from amp_deploy.prune import budget as B

    table = B.latency_table([64, 128, 256], 2, {64: [0.6], 128: [0.8]}, {64: [1.0], 128: [1.0]})
    curves = B.Curves(widths=[[64, 128, 256]] * 2, losses=[[0.3, 0.1, 0.0]] * 2, base_loss=0.0)
    for aim in (1.0, 0.93):  # a check that overshot corrected the aim below 1x
        assert B.choose_widths(table, curves, aim).widths == [256, 256]
    res = build(tiny_recipe(tmp_path, prune={"align": 4096}), "--out", tmp_path / "o")
    _refused(res, "prune.align")


# --- 7: compare ----------------------------------------------------------------------------------------

def _report_copy(src: Path, dst: Path, rounds: int | None = None, factor: float = 1.0, status: str | None = None,
                 drop: str | None = None) -> Path:
    rep = json.loads((src / "report.json").read_text())
    row = rep["runtimes"]["onnxruntime"]
    for model in ("original", "pruned"):
        for b, lat in row["latency_ms"][model].items():
            if rounds:
                lat["samples"] = lat["samples"][:rounds]
            if model == "pruned":
                lat["samples"] = [v * factor for v in lat["samples"]]
                lat["p50"] *= factor
                lat["throughput"] /= factor
    if status:
        rep["runtimes"]["onnxruntime"] = {"status": status, "reason": "InvalidGraph: broken"}
    if drop:
        rep.pop(drop)
    dst.mkdir()
    (dst / "report.json").write_text(json.dumps(rep))
    return dst


def test_the_regression_gate_says_it_cannot_judge_four_rounds_exit_3(quickstart, tmp_path):
    a = _report_copy(quickstart[0], tmp_path / "a", rounds=4)
    b = _report_copy(quickstart[0], tmp_path / "b", rounds=4, factor=10.0)
    res = runner.invoke(app, ["compare", str(a), str(b), "--fail-on-regression", "5"])
    assert res.exit_code == 3, res.output
    assert "could not judge" in res.output and "validate.iterations >= 10" in res.output


def test_the_regression_gate_counts_a_runtime_that_failed_and_refuses_bad_thresholds(quickstart, tmp_path):
    a = _report_copy(quickstart[0], tmp_path / "a")
    b = _report_copy(quickstart[0], tmp_path / "b", status="failed")
    res = runner.invoke(app, ["compare", str(a), str(b), "--fail-on-regression", "5"])
    assert res.exit_code == 1 and "failed here" in res.output, res.output
    skipped = _report_copy(quickstart[0], tmp_path / "c", status="skipped")
    res = runner.invoke(app, ["compare", str(a), str(skipped), "--fail-on-regression", "5"])
    assert res.exit_code == 3, res.output
    for bad in ("-5", "nan", "inf"):
        assert_one_line_error(runner.invoke(app, ["compare", str(a), str(a), "--fail-on-regression", bad]),
                              "--fail-on-regression")
    broken = _report_copy(quickstart[0], tmp_path / "d", drop="runtimes")
    assert_one_line_error(runner.invoke(app, ["compare", str(a), str(broken)]), "no 'runtimes' section")


def test_the_compare_table_is_whole_in_a_log(quickstart):
    res = runner.invoke(app, ["compare", str(quickstart[0]), str(quickstart[0])])  # no terminal, as in CI
    assert res.exit_code == 0, res.output
    assert "…" not in res.output and "onnxruntime" in res.output and "pruned" in res.output


# --- 8: quantization -------------------------------------------------------------------------------------

def test_an_unknown_op_type_is_refused_before_any_work(tmp_path):
    out = tmp_path / "o"
    res = build(_folder_recipe(tmp_path, _images(tmp_path / "images"),
                               quantize={"formats": ["onnxruntime-int8"], "op_types": ["MatMull"], "calibration": 8}),
                "--out", out)
    assert_one_line_error(res, "quantize.op_types: 'MatMull'")
    assert not (out / "scores.safetensors").exists()


def test_a_quantized_model_with_no_quantized_matrix_product_fails_its_gate(tmp_path):
    out = tmp_path / "o"
    res = build(_folder_recipe(tmp_path, _images(tmp_path / "images"),
                               quantize={"formats": ["onnxruntime-int8"], "op_types": ["Add"], "method": "minmax",
                                         "calibration": 8}), "--out", out)
    assert res.exit_code == 1, res.output
    assert "no matrix product quantized" in res.output
    md = (out / "report.md").read_text()
    assert "Quantization gate: FAILED" in md


# --- 9-12: messages and files ------------------------------------------------------------------------------

def test_triton_into_a_file_is_one_line(quickstart, tmp_path):
    target = tmp_path / "repo.txt"
    target.write_text("x")
    assert_one_line_error(runner.invoke(app, ["triton", str(quickstart[0]), "--repo", str(target)]), "--repo")


def test_brackets_in_an_error_are_printed(monkeypatch, quickstart, tmp_path):
    import amp_deploy.pipeline.serving as serving

    def refuse(*a, **k):
        raise UserError("install it: pip install 'amp-deploy[modelopt]'")

    monkeypatch.setattr(serving, "triton_entry", refuse)
    res = runner.invoke(app, ["triton", str(quickstart[0]), "--repo", str(tmp_path / "r")])
    assert_one_line_error(res, "'amp-deploy[modelopt]'")


def test_a_full_disk_names_the_file_and_the_stage(tmp_path, monkeypatch):
    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".search.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    res = build(tiny_recipe(tmp_path), "--out", tmp_path / "o")
    last = _refused(res, "stage 'search'")
    assert "search.json" in last and "no space left" in last


def test_a_cross_field_message_names_its_key_once(tmp_path):
    res = build(tiny_recipe(tmp_path, prune={"target_params": 0.5, "target_speedup": 1.2}), "--out", tmp_path / "o")
    assert_one_line_error(res, "prune: target_params and target_speedup are both set")
    assert "prune: prune:" not in res.output


def test_onnxruntime_native_warnings_stay_quiet(tmp_path, capfd):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from amp_deploy.deploy.runtimes import onnxruntime_runner

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
             numpy_helper.from_array(np.ones(3, dtype=np.float32), "unused")]
    g = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["y"])], "g", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(tmp_path / "m.onnx"))
    onnxruntime_runner(tmp_path / "m.onnx")
    import onnxruntime as ort

    ort.InferenceSession(str(tmp_path / "m.onnx"))  # a session opened as a library (the quantizer) opens it
    assert "Removing initializer" not in capfd.readouterr().err


def test_checkpoints_follow_the_umask_like_every_output(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o"
        assert build(tiny_recipe(tmp_path), "--out", out).exit_code == 0
    finally:
        os.umask(old)
    for name in ("scores.safetensors", "pruned.safetensors", "search.json", "pruned.onnx"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# --- 14: what the report says ------------------------------------------------------------------------------

def test_an_embedding_model_shows_its_fidelity_and_no_n_a(tmp_path):
    out = tmp_path / "o"
    model = {"source": "timm", "name": "test_vit", "kwargs": {"depth": 2, "img_size": 32, "num_classes": 0}}
    res = build(tiny_recipe(tmp_path, model=model), "--out", out)
    assert res.exit_code == 0, res.output
    assert "output cosine to the original" in res.output
    md = (out / "report.md").read_text()
    assert "n/a%" not in md and "threshold 0.05" in md


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resident-set high-water mark")
def test_a_session_holds_its_weights_measured_in_a_fresh_process(tmp_path):
    """The old figure (this process, after other sessions) read 0.1 MiB for a 22M-parameter model: a
    session can reuse freed pages. Measured in a child of its own, it holds at least its weights, and
    says the same each time."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from amp_deploy.deploy.session_memory import SessionSpec, result, start

    w = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB
    graph = helper.make_graph([helper.make_node("MatMul", ["pixel_values", "w"], ["output"])], "g",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 2048])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 2048])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    spec = SessionSpec("onnxruntime", str(path), 1)
    first, second = (result(start(spec, (8, 2048))) for _ in range(2))
    assert first[1] is None and second[1] is None, (first, second)
    assert first[0] >= w.nbytes and abs(first[0] - second[0]) <= 0.25 * first[0], (first, second)


def test_every_cpu_row_measures_its_sessions_in_a_fresh_process(quickstart):
    rep = json.loads((quickstart[0] / "report.json").read_text())
    for k, mem in rep["runtimes"]["onnxruntime"]["memory"].items():
        assert mem["host_peak_measured_in"] == "a fresh process", mem
        if mem["host_peak_bytes"] is not None:
            assert mem["host_peak_bytes"] >= mem["weights_bytes"], (k, mem)
    assert "measured in a fresh process" in (quickstart[0] / "report.md").read_text()


def test_a_latency_budget_report_names_the_budget_not_a_threshold():
    from amp_deploy.measure.report import _how_md

    rep = {"prune": {"threshold": None, "target_params": None, "search": "adaptive"},
           "latency_budget": {"target_speedup": 1.3, "runtime": "onnxruntime", "precision": "fp32", "batch": 8}}
    assert _how_md(rep) == "latency budget 1.3x on onnxruntime fp32 at batch 8"
    rep = {"prune": {"threshold": 0.0123, "target_params": 0.7, "search": "adaptive"}}
    assert _how_md(rep) == "parameter budget 0.7, threshold 0.0123"


# --- 15: distillation's learning rate, measured ----------------------------------------------------------

def test_the_learning_rate_probe_chooses_by_the_held_out_loss_not_by_size():
    import torch
    from torch import nn

    from amp_deploy.prune.distill import probe_lr

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    images, held_out = torch.randn(64, 8), torch.randn(32, 8)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    train = dict(batch_size=16, warmup=0.25, weight_decay=0.0, loss="mse", seed=0)
    slow = probe_lr(student, teacher, images, held_out, epochs=4, steps=12, candidates=(1e-7, 1e-2), **train)
    assert slow["lr"] == 1e-2 and slow["losses"]["1e-07"] > slow["losses"]["0.01"]  # too small: learns nothing
    wild = probe_lr(student, teacher, images, held_out, epochs=4, steps=12, candidates=(1e-2, 30.0), **train)
    assert wild["lr"] == 1e-2  # too large: worse (or diverged)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # the probes trained copies


def test_distill_lr_auto_is_probed_recorded_and_used(tmp_path):
    out = tmp_path / "o"
    recipe = _folder_recipe(tmp_path, _images(tmp_path / "images"),
                            distill={"epochs": 1, "batch_size": 8, "lr_candidates": [1e-5, 1e-3]})
    res = build(recipe, "--out", out)
    assert res.exit_code == 0, res.output
    log = json.loads((out / "distill.json").read_text())
    probe = log["lr_probe"]
    assert log["lr_setting"] == "auto" and set(probe["losses"]) == {"1e-05", "0.001"}
    assert log["lr"] == min((1e-5, 1e-3), key=lambda r: (probe["losses"][repr(r)], r))
    assert "chosen by the probe" in res.output and "Learning rate chosen by the probe" in (out / "report.md").read_text()


def test_a_key_of_two_types_gets_one_line():
    res = runner.invoke(app, ["check", str(QUICKSTART), "distill.lr=fast"])
    assert_one_line_error(res, "distill.lr: Input should be a valid number, or Input should be 'auto'")
