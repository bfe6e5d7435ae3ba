"""Triton model repository entries, checked with Triton's own ModelConfig proto."""


import numpy as np
import pytest
from typer.testing import CliRunner

from amp_deploy.cli import app
from amp_deploy.deploy.runtimes import onnxruntime_runner
from amp_deploy.deploy.triton import config_text

# Installed by the test extra; missing only on machines that run a subset (the GPU check's `-m gpu`).
mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")
text_format = pytest.importorskip("google.protobuf.text_format")
runner = CliRunner()


def _parse(path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_onnxruntime_entry_serves_the_pruned_model(quickstart, tmp_path):
    out = quickstart[0]
    res = runner.invoke(app, ["triton", str(out), "--repo", str(tmp_path / "repo")])
    assert res.exit_code == 0, res.output
    entry = tmp_path / "repo" / "quickstart"
    cfg = _parse(entry / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("quickstart", "onnxruntime", 32)
    assert list(cfg.input[0].dims) == [3, 8, 8] and list(cfg.output[0].dims) == [10]
    assert cfg.input[0].data_type == mc.TYPE_FP32 and cfg.input[0].name == "pixel_values"
    assert (entry / "1" / "model.onnx").read_bytes() == (out / "pruned.onnx").read_bytes()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert onnxruntime_runner(entry / "1" / "model.onnx").run(x).shape == (2, 10)
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name.startswith(".")]


def test_tensorrt_plans_are_keyed_by_compute_capability():
    text = config_text("vit", "tensorrt", [3, 224, 224], [768], "TYPE_FP16", 16, {"9.0": "model_9.0.plan"})
    cfg = text_format.Parse(text, mc.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and dict(cfg.cc_model_filenames) == {"9.0": "model_9.0.plan"}
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and cfg.input[0].data_type == mc.TYPE_FP16


def test_tensorrt_entry_without_an_engine_is_a_clear_error(quickstart, tmp_path):
    res = runner.invoke(app, ["triton", str(quickstart[0]), "--repo", str(tmp_path), "--backend", "tensorrt"])
    assert res.exit_code == 2 and "no pruned.plan" in res.output
    assert not list(tmp_path.iterdir())
