"""OpenVINO on the CPU (issue 27): IR beside the ONNX files, fp32 / bf16 / NNCF INT8 rows measured like
ONNX Runtime's, the precision it really ran, the latency budget's runner, Triton's openvino backend,
and bad settings refused before any work."""

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from amp_deploy.cli import app

from .conftest import FAST, QUICKSTART, assert_one_line_error, build, tiny_recipe

ov = pytest.importorskip("openvino", reason="openvino is not installed (the openvino extra)")
runner = CliRunner()


def _has_bf16() -> bool:
    from amp_deploy.deploy.openvino import bf16_problem

    return bf16_problem() is None


@pytest.fixture(scope="session")
def ov_build(tmp_path_factory):
    """The quickstart with OpenVINO fp32 (and bf16 where the CPU has it) and NNCF INT8 beside ONNX Runtime."""
    out = tmp_path_factory.mktemp("ov") / "out"
    runtimes = ["onnxruntime", "openvino"] + (["openvino-bf16"] if _has_bf16() else [])
    res = build(QUICKSTART, "--out", out, *FAST, f"runtimes=[{','.join(runtimes)}]",
                "quantize.formats=[openvino-int8]", "quantize.calibration=128")
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "report.json").read_text())


def test_openvino_rows_have_parity_latency_and_the_precision_they_ran(ov_build):
    out, rep = ov_build
    row = rep["runtimes"]["openvino"]
    assert row["status"] == "ok" and row["precision"] == "fp32"
    assert row["settings"]["inference_precision_hint"] == "f32"
    assert set(row["settings"]["execution_precision"]) == {"f32"}  # every matrix product ran in f32, as pinned
    for k in ("original", "pruned"):
        assert row["parity"][k]["max_abs_err"] < 1e-4 and row["parity"][k]["cosine_min"] > 0.99999
        assert all(row["latency_ms"][k][b]["p50"] > 0 for b in ("1", "8"))
    assert rep["gates"]["parity"]["passed"]
    for name in ("original.xml", "original.bin", "pruned.xml", "pruned.bin"):
        assert (out / name).stat().st_size > 0
    if "openvino-bf16" in rep["runtimes"]:
        bf = rep["runtimes"]["openvino-bf16"]
        assert bf["precision"] == "bf16" and "bf16" in bf["settings"]["execution_precision"]
        assert 1e-5 < bf["parity"]["pruned"]["max_abs_err"] and bf["parity"]["pruned"]["cosine_mean"] >= 0.999


def test_openvino_int8_keeps_top1_within_half_a_point_and_runs_int8(ov_build):
    out, rep = ov_build
    row = rep["runtimes"]["openvino-int8"]
    assert row["status"] == "ok" and row["precision"] == "int8"
    prec = row["settings"]["execution_precision"]
    assert prec.get("u8", 0) + prec.get("i8", 0) > 0  # NNCF's products really ran in int8
    assert abs(row["fidelity"]["original"]["accuracy"] - rep["fidelity"]["accuracy_original"]) <= 0.5
    info = rep["quantize"]["formats"]["openvino-int8"]["pruned"]
    assert info["quantized_matmuls"] > 0 and info["calibration_images"] == 128
    assert rep["gates"]["quantization"]["passed"]
    assert (out / "pruned.openvino-int8.xml").is_file() and (out / "pruned.openvino-int8.bin").is_file()


def test_the_ir_is_keyed_like_every_artifact(ov_build, tmp_path):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(ov_build[0], out)
    (out / "pruned.bin").unlink()
    runtimes = ["onnxruntime", "openvino"] + (["openvino-bf16"] if _has_bf16() else [])
    res = build(QUICKSTART, "--out", out, *FAST, f"runtimes=[{','.join(runtimes)}]",
                "quantize.formats=[openvino-int8]", "quantize.calibration=128")
    assert res.exit_code == 0 and "export: done" in res.output and "score: inputs unchanged" in res.output
    assert (out / "pruned.bin").is_file()


def test_a_triton_openvino_entry_serves_the_ir(ov_build, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from amp_deploy.deploy.runtimes import onnxruntime_runner, openvino_runner

    out = ov_build[0]
    for backend, src in (("openvino", "pruned.xml"), ("openvino-int8", "pruned.openvino-int8.xml")):
        repo = tmp_path / backend
        res = runner.invoke(app, ["triton", str(out), "--repo", str(repo), "--backend", backend])
        assert res.exit_code == 0, res.output
        entry = repo / "quickstart"
        cfg = text_format.Parse((entry / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.backend == "openvino" and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert (entry / "1" / "model.xml").read_bytes() == (out / src).read_bytes()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    served = openvino_runner(tmp_path / "openvino" / "quickstart" / "1" / "model.xml").run(x)
    np.testing.assert_allclose(served, onnxruntime_runner(out / "pruned.onnx").run(x), atol=1e-4)


def test_the_latency_budget_opens_openvino_runners_as_the_build_does(tmp_path):
    from amp_deploy.pipeline.context import Context
    from amp_deploy.pipeline.speedup import runner_factory
    from amp_deploy.recipe import load_recipe

    recipe = load_recipe(QUICKSTART, ["runtimes=[openvino]", "prune.target_speedup=1.1",
                                      "prune.latency.runtime=openvino"])
    ctx = Context.create(recipe, tmp_path)
    loaded = ctx.original()
    opener = runner_factory(ctx, loaded.input_size, tmp_path)(lambda: ctx.original().model, "full")
    r = opener()
    x = np.random.default_rng(0).standard_normal((8, *loaded.input_size)).astype(np.float32)
    assert r.run(x).shape == (8, 10) and set(r.info["execution_precision"]) == {"f32"}


# --- refused before any work ------------------------------------------------------------------------------

def test_bf16_on_a_cpu_without_bf16_units_is_refused(tmp_path, monkeypatch):
    import amp_deploy.deploy.openvino as OV

    monkeypatch.setattr(OV, "cpu_capabilities", lambda: ["FP32", "INT8"])
    out = tmp_path / "o"
    res = build(QUICKSTART, "--out", out, "runtimes=[openvino-bf16]")
    assert_one_line_error(res, "openvino bf16: this CPU has no BF16 units")
    assert not (out / "scores.safetensors").exists()


def test_openvino_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    res = build(QUICKSTART, "--out", tmp_path / "o", "runtimes=[openvino]")
    assert_one_line_error(res, "pip install 'amp-deploy[openvino]'")


def test_int8_without_calibration_images_and_a_precision_openvino_cannot_run_are_refused(tmp_path):
    res = build(tiny_recipe(tmp_path, runtimes=["openvino"], quantize={"formats": ["openvino-int8"]}),
                "--out", tmp_path / "a")
    assert_one_line_error(res, "calibration needs real images")
    res = build(QUICKSTART, "--out", tmp_path / "b", "runtimes=[openvino]", "prune.target_speedup=1.2",
                "prune.latency.runtime=openvino", "prune.latency.precision=fp16")
    assert_one_line_error(res, "prune.latency.precision")
    res = build(QUICKSTART, "--out", tmp_path / "c", "runtimes=[onnxruntime]", "quantize.formats=[openvino-int8]")
    assert_one_line_error(res, "openvino-int8 is validated on openvino")
