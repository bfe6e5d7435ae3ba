"""OpenVINO on the CPU (issue 27): IR beside the ONNX files, fp32 / bf16 / NNCF INT8 rows measured like
ONNX Runtime's, the precision it really ran, the latency budget's runner, Triton's openvino backend,
and bad settings refused before any work."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from amp_deploy.cli import app

from .conftest import FAST, QUICKSTART, assert_one_line_error, build, tiny_recipe

# Not imported here: OpenVINO's sessions run in child processes (a build, a runner), so that no xdist worker
# keeps OpenVINO's thread pool and allocations beside the other tests' runtimes.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason="openvino is not installed (the openvino extra)")
runner = CliRunner()


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amp_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COLUMNS": "200"})


def _py(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _has_bf16() -> bool:
    return _py("from amp_deploy.deploy.openvino import bf16_problem; print(bf16_problem() is None)").strip() == "True"


@pytest.fixture(scope="session")
def ov_build(tmp_path_factory):
    """The quickstart with OpenVINO fp32 (and bf16 where the CPU has it) and NNCF INT8 beside ONNX Runtime."""
    out = tmp_path_factory.mktemp("ov") / "out"
    runtimes = ["onnxruntime", "openvino"] + (["openvino-bf16"] if _has_bf16() else [])
    res = _cli("build", QUICKSTART, "--out", out, *FAST, f"runtimes=[{','.join(runtimes)}]",
               "quantize.formats=[openvino-int8]", "quantize.calibration=128")
    assert res.returncode == 0, res.stderr
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
    res = _cli("build", QUICKSTART, "--out", out, *FAST, f"runtimes=[{','.join(runtimes)}]",
               "quantize.formats=[openvino-int8]", "quantize.calibration=128")
    assert res.returncode == 0 and "export: done" in res.stderr and "score: inputs unchanged" in res.stderr, res.stderr
    assert (out / "pruned.bin").is_file()


def test_a_triton_openvino_entry_serves_the_ir(ov_build, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    out = ov_build[0]
    for backend, src in (("openvino", "pruned.xml"), ("openvino-int8", "pruned.openvino-int8.xml")):
        repo = tmp_path / backend
        res = runner.invoke(app, ["triton", str(out), "--repo", str(repo), "--backend", backend])
        assert res.exit_code == 0, res.output
        entry = repo / "quickstart"
        cfg = text_format.Parse((entry / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.backend == "openvino" and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert (entry / "1" / "model.xml").read_bytes() == (out / src).read_bytes()
    served = tmp_path / "openvino" / "quickstart" / "1" / "model.xml"
    diff = _py("import numpy as np\n"
               "from amp_deploy.deploy.runtimes import onnxruntime_runner, openvino_runner\n"
               "x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)\n"
               f"a = openvino_runner({str(served)!r}).run(x)\n"
               f"b = onnxruntime_runner({str(out / 'pruned.onnx')!r}).run(x)\n"
               "print(float(np.abs(a - b).max()))")
    assert float(diff) < 1e-4


def test_the_latency_budget_opens_openvino_runners_as_the_build_does(tmp_path):
    code = f"""
import numpy as np
from amp_deploy.pipeline.context import Context
from amp_deploy.pipeline.speedup import runner_factory
from amp_deploy.recipe import load_recipe
recipe = load_recipe({str(QUICKSTART)!r}, ["runtimes=[openvino]", "prune.target_speedup=1.1",
                                             "prune.latency.runtime=openvino"])
ctx = Context.create(recipe, {str(tmp_path)!r})
loaded = ctx.original()
r = runner_factory(ctx, loaded.input_size, ctx.folder.root)(lambda: ctx.original().model, "full")()
x = np.random.default_rng(0).standard_normal((8, *loaded.input_size)).astype(np.float32)
print(r.run(x).shape, sorted(r.info["execution_precision"]))
"""
    assert _py(code).strip() == "(8, 10) ['f32']"


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
