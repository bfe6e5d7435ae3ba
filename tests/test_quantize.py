"""Quantization after pruning: the calibration reader, ONNX Runtime INT8 and Model Optimizer Q/DQ,
the gates, the refusals and resume (issue 19)."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from amp_deploy.data import Split
from amp_deploy.deploy import quantize as Q
from amp_deploy.errors import UserError
from amp_deploy.measure.report import apply_parity_gate, apply_quantization_gate
from amp_deploy.recipe import load_recipe

from .conftest import FAST, QUICKSTART, assert_one_line_error, build

ALL = "quantize.formats=[onnxruntime-int8,tensorrt-int8,tensorrt-fp8]"
needs_modelopt = pytest.mark.skipif(Q.modelopt_problem() is not None, reason=str(Q.modelopt_problem()))


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def quantized(quickstart, tmp_path_factory):
    """The quickstart build, resumed with every quantization format on: (folder, console output)."""
    if Q.modelopt_problem():
        pytest.skip(Q.modelopt_problem())
    out = tmp_path_factory.mktemp("quant") / "out"
    shutil.copytree(quickstart[0], out)
    res = build(QUICKSTART, "--out", out, *FAST, ALL)
    assert res.exit_code == 0, res.output
    return out, res.output


def test_calibration_batches_take_the_first_images_in_order_within_the_batch_limit():
    images = torch.arange(10 * 3 * 2 * 2, dtype=torch.float32).reshape(10, 3, 2, 2)
    split = Split(images, torch.arange(10))
    batches = Q.calibration_batches(split.batches(4), count=7, batch_max=3)
    assert [len(b) for b in batches] == [3, 1, 3]  # batches of 4 read, each cut to the export's max of 3
    np.testing.assert_array_equal(np.concatenate(batches), images[:7].numpy())
    reader = Q.CalibrationReader(batches)
    assert len(reader) == 7
    got = []
    while (item := reader.get_next()) is not None:
        got.append(item["pixel_values"])
    assert len(got) == 3 and reader.get_next() is None
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["pixel_values"], batches[0])
    np.testing.assert_array_equal(reader.get_first()["pixel_values"], batches[0])
    with pytest.raises(UserError, match="no calibration image"):
        Q.CalibrationReader([])


def test_the_quantize_stage_calibrates_on_calibration_images_never_the_holdout(monkeypatch, tmp_path):
    from amp_deploy.pipeline.context import Context
    from amp_deploy.pipeline.stages import stage_quantize

    recipe = load_recipe(QUICKSTART, ["quantize.formats=[onnxruntime-int8]", "quantize.calibration=40"])
    ctx = Context.create(recipe, tmp_path)
    seen = []

    def fake(src, dst, reader, **kw):
        seen.append(np.concatenate(reader.batches))
        dst.write_bytes(b"")
        return {}

    monkeypatch.setattr(Q, "quantize_onnxruntime", fake)
    monkeypatch.setattr(Q, "matmul_coverage", lambda *a: {"blocks": {}, "outside": {"matmuls": 0, "quantized": 0, "float": []}})
    stage_quantize(ctx)
    data = ctx.data()
    assert len(seen) == 2 and all(len(s) == 40 for s in seen)
    np.testing.assert_array_equal(seen[0], data.calibration.images[:40].numpy())
    holdout = data.holdout.images.flatten(1)
    assert not (torch.cdist(torch.from_numpy(seen[0]).flatten(1), holdout) == 0).any()


def test_quickstart_int8_on_onnxruntime_keeps_top1_and_reports_parity(quantized):
    out, output = quantized
    assert "score: inputs unchanged, skipped" in output and "export: inputs unchanged, skipped" in output
    rep = _report(out)
    row = rep["runtimes"]["onnxruntime-int8"]
    assert row["status"] == "ok" and row["precision"] == "int8"
    for k in ("original", "pruned"):
        par = row["parity"][k]
        assert 1e-4 < par["max_abs_err"] and 0.99 <= par["cosine_mean"] < 1  # quantized, and close to fp32
    fid = row["fidelity"]
    assert abs(fid["original"]["accuracy"] - rep["fidelity"]["accuracy_original"]) <= 0.5
    assert abs(fid["pruned"]["accuracy"] - rep["fidelity"]["accuracy_pruned"]) <= 0.5
    assert row["memory"]["pruned"]["weights_bytes"] < rep["runtimes"]["onnxruntime"]["memory"]["pruned"]["weights_bytes"]
    assert rep["gates"]["quantization"]["passed"] and rep["gates"]["parity"]["passed"]
    md = (out / "report.md").read_text()
    assert "## Quantization" in md and "pruned onnxruntime-int8" in md


def test_model_optimizer_qdq_models_pass_the_checker_with_every_block_quantized(quantized, quickstart):
    out, _ = quantized
    for which in ("original", "pruned"):  # Model Optimizer edits the file it is given: it got a copy
        assert (out / f"{which}.onnx").read_bytes() == (quickstart[0] / f"{which}.onnx").read_bytes()
    log = json.loads((out / "quantize.json").read_text())
    for fmt, zero_type in (("tensorrt-int8", onnx.TensorProto.INT8), ("tensorrt-fp8", onnx.TensorProto.FLOAT8E4M3FN),
                           ("onnxruntime-int8", onnx.TensorProto.UINT8)):
        for which in ("original", "pruned"):
            path = out / f"{which}.{fmt}.onnx"
            onnx.checker.check_model(str(path), full_check=True)
            cov = Q.matmul_coverage(path, out / f"{which}.onnx")
            assert len(cov["blocks"]) == 4 and not Q.coverage_problems(cov, per_block=6), cov
            assert log["formats"][fmt][which]["coverage_problems"] == []
            model = onnx.load(str(path))
            inits = {t.name: t for t in model.graph.initializer}
            zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"
                           and len(n.input) > 2 and n.input[2] in inits]
            assert zero_points and {z.data_type for z in zero_points} == {zero_type}
    rep = _report(out)
    on_cpu = rep["runtimes"]["tensorrt-int8-on-onnxruntime"]
    assert on_cpu["status"] == "ok" and on_cpu["fidelity"]["pruned"]["cosine_mean"] > 0.9
    assert abs(on_cpu["fidelity"]["pruned"]["accuracy"] - rep["fidelity"]["accuracy_pruned"]) <= 1.0
    fp8 = rep["runtimes"]["tensorrt-fp8-on-onnxruntime"]
    assert fp8["status"] == "skipped" and "float8" in fp8["reason"]
    for name in ("tensorrt-int8", "tensorrt-fp8"):  # no TensorRT here: skipped with the reason, never passed
        assert rep["runtimes"][name]["status"] in ("skipped", "ok")
        if rep["runtimes"][name]["status"] == "skipped":
            assert rep["runtimes"][name]["reason"]


def test_changing_a_quantize_setting_redoes_quantize_only(quantized, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quantized[0], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}
    res = build(QUICKSTART, "--out", out, *FAST, "quantize.formats=[onnxruntime-int8]", "quantize.method=minmax")
    assert res.exit_code == 0, res.output
    assert "quantize: done" in res.output and "export: inputs unchanged, skipped" in res.output
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}
    assert after["pruned.onnx"] == before["pruned.onnx"]
    assert after["pruned.onnxruntime-int8.onnx"] != before["pruned.onnxruntime-int8.onnx"]
    log = json.loads((out / "quantize.json").read_text())
    assert list(log["formats"]) == ["onnxruntime-int8"] and log["formats"]["onnxruntime-int8"]["pruned"]["method"] == "minmax"
    assert set(_report(out)["runtimes"]) == {"onnxruntime", "tensorrt", "onnxruntime-int8"}
    again = build(QUICKSTART, "--out", out, *FAST, "quantize.formats=[onnxruntime-int8]", "quantize.method=minmax")
    assert "quantize: inputs unchanged, skipped" in again.output
    (out / "pruned.onnxruntime-int8.onnx").unlink()  # a lost output is made again
    third = build(QUICKSTART, "--out", out, *FAST, "quantize.formats=[onnxruntime-int8]", "quantize.method=minmax")
    assert third.exit_code == 0 and "quantize: done" in third.output
    assert (out / "pruned.onnxruntime-int8.onnx").is_file()


def test_relative_paths_work_though_the_quantizers_run_in_their_own_folder(quickstart, tmp_path, monkeypatch):
    shutil.copy(quickstart[0] / "pruned.onnx", tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8), dtype=np.float32)
    info = Q.quantize_onnxruntime("m.onnx", "q.onnx", Q.CalibrationReader([x]))
    assert (tmp_path / "q.onnx").is_file() and info["ops"]["QuantizeLinear"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.onnx"]  # no scratch file left
    if Q.modelopt_problem() is None:
        Q.quantize_modelopt("m.onnx", "t.onnx", Q.CalibrationReader([x]), precision="int8")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.onnx", "t.onnx"]


def test_a_model_with_external_data_is_quantized_with_external_data(tiny_vit, tmp_path, monkeypatch):
    """Models over 2 GB keep their weights beside the .onnx (protobuf's limit): both quantizers get
    that flag and their data files move into place with the model (forced here on a small model)."""
    from amp_deploy.deploy import export as E
    from amp_deploy.deploy.runtimes import onnxruntime_runner

    monkeypatch.setattr(E, "EXTERNAL_DATA_LIMIT", 64 << 20)  # every model "large"
    src = E.export_onnx(tiny_vit.model, tmp_path / "m.onnx", tiny_vit.input_size, batch_min=1, batch_opt=2, batch_max=4)
    assert E.external_files(src)
    x = torch.randn(8, *tiny_vit.input_size).numpy()
    reader = Q.CalibrationReader([x[:4], x[4:]])
    outs = [tmp_path / "q.onnx"]
    Q.quantize_onnxruntime(src, outs[0], reader)
    if Q.modelopt_problem() is None:
        outs.append(tmp_path / "t.onnx")
        Q.quantize_modelopt(src, outs[1], reader, precision="int8")
    ref = onnxruntime_runner(src).run(x[:2])
    for out in outs:
        data = E.external_files(out)
        assert data and all(d.is_file() and d.name.startswith(out.name) for d in data)
        got = onnxruntime_runner(out).run(x[:2])
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got).flatten(1), torch.from_numpy(ref).flatten(1))
        assert cos.min() > 0.5  # a random-init model, 8 calibration images: close, not exact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left


def _row(precision, cos_mean, cos_min, err=0.1):
    p = {"max_abs_err": err, "cosine_min": cos_min, "cosine_mean": cos_mean}
    return {"status": "ok", "precision": precision, "parity": {"original": p, "pruned": p, **p}}


def test_the_quantization_gate_judges_each_precision_with_its_own_limits():
    gates = {"int8": {"cosine_mean": 0.99, "cosine_min": 0.9, "max_abs_err": None},
             "fp8": {"cosine_mean": 0.995, "cosine_min": 0.95, "max_abs_err": 0.05}}
    rep = {"runtimes": {"onnxruntime": _row("fp32", 1.0, 0.999999, 1e-6), "onnxruntime-int8": _row("int8", 0.993, 0.92),
                        "tensorrt-fp8": _row("fp8", 0.993, 0.92)}}
    assert apply_parity_gate(rep, 1e-4, 0.99999) == []  # quantized rows are not held to fp32's tolerances
    breaches = apply_quantization_gate(rep, gates)
    assert not any(b.startswith("onnxruntime-int8") for b in breaches)
    assert {b.split(":")[0] for b in breaches} == {"tensorrt-fp8 original", "tensorrt-fp8 pruned"}
    assert any("cosine_mean 0.99300 < 0.995" in b for b in breaches) and any("max_abs_err" in b for b in breaches)
    assert rep["gates"]["quantization"]["passed"] is False
    rep["runtimes"]["onnxruntime-int8"] = _row("int8", float("nan"), 0.95)
    assert any(b.startswith("onnxruntime-int8") for b in apply_quantization_gate(rep, gates))  # NaN breaches


def test_a_failed_quantization_gate_exits_1_with_the_report_written(quantized, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quantized[0], out)
    res = build(QUICKSTART, "--out", out, *FAST, ALL, "validate.parity_int8.cosine_mean=0.99999")
    assert res.exit_code == 1, res.output
    assert "quantization gate failed" in res.output and "onnxruntime-int8" in res.output
    assert _report(out)["gates"]["quantization"]["passed"] is False
    assert "quantize: inputs unchanged, skipped" in res.output  # a gate is judged again, nothing re-made


@pytest.mark.parametrize("overrides, needle", [
    (["quantize.formats=[onnxruntime-int8]", "runtimes=[tensorrt]"], "is not in runtimes"),
    (["quantize.formats=[int4]"], "quantize.formats.0"),
    (["quantize.formats=[onnxruntime-int8]", "quantize.calibration=9999"], "data.calibration has 512"),
    (["quantize.formats=[onnxruntime-int8]", "data.source=synthetic"], "calibration needs real images"),
    (["quantize.formats=[onnxruntime-int8,onnxruntime-int8]"], "names a format twice"),
])
def test_bad_quantize_settings_exit_2_before_any_work(tmp_path, overrides, needle):
    res = build(QUICKSTART, "--out", tmp_path / "out", *overrides)
    assert_one_line_error(res, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("version, needle", [(None, "nvidia-modelopt is not installed"),
                                             ((0, 21, 0), "is too old")])
def test_model_optimizer_missing_or_too_old_exits_2(tmp_path, monkeypatch, version, needle):
    monkeypatch.setattr(Q, "modelopt_version", lambda: version)
    res = build(QUICKSTART, "--out", tmp_path / "out", "quantize.formats=[tensorrt-int8]")
    assert_one_line_error(res, needle)
    assert not (tmp_path / "out").exists()


@needs_modelopt
def test_model_optimizer_without_the_api_is_named(monkeypatch):
    import modelopt.onnx.quantization as mq

    monkeypatch.setattr(mq, "quantize", lambda onnx_path, quantize_mode="int8": None)
    assert "lacks calibration_data_reader" in Q.modelopt_problem()


def test_fp8_on_a_gpu_without_fp8_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr(Q, "modelopt_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    res = build(QUICKSTART, "--out", tmp_path / "out", "--device", "cpu", "quantize.formats=[tensorrt-fp8]")
    assert_one_line_error(res, "needs a GPU with compute capability >= 8.9")
    assert "A100 has 8.0" in res.output


def test_onnxruntime_int8_is_quantized_again_on_another_cpu(monkeypatch):
    """Its weights' range follows the CPU (7 bits without VNNI): the quantize key follows the machine
    where an ONNX Runtime INT8 format is asked, and only there."""
    from amp_deploy.pipeline import manifest
    from amp_deploy.pipeline.stages import STAGES
    from amp_deploy.recipe import load_recipe

    with_ort = load_recipe(QUICKSTART, ["quantize.formats=[onnxruntime-int8]"])
    without = load_recipe(QUICKSTART)
    here = [manifest.stage_keys(r, STAGES)["quantize"] for r in (with_ort, without)]
    real = manifest.machine
    monkeypatch.setattr(manifest, "machine", lambda: {**real(), "cpu": "another CPU model"})
    there = [manifest.stage_keys(r, STAGES)["quantize"] for r in (with_ort, without)]
    assert here[0] != there[0] and here[1] == there[1]
