"""TensorRT and ONNX Runtime paths checked on a CPU: what can be proved without a GPU or TensorRT."""

import json
import sys

import numpy as np
import pytest
import torch

from amp_deploy.deploy.export import export_onnx
from amp_deploy.deploy.runtimes import Runner, missing_libraries, tensorrt_providers
from amp_deploy.deploy.tensorrt_engine import _need, device_memory_bytes, installed_version, timing_cache_path
from amp_deploy.errors import UserError
from amp_deploy.measure.report import parity_breaches
from amp_deploy.measure.validation import chunks, parity_of

from .conftest import build, tiny_recipe


def test_a_failed_compile_is_not_recorded_and_the_next_build_tries_again(tmp_path, monkeypatch):
    import amp_deploy.deploy.runtimes as R
    import amp_deploy.deploy.tensorrt_engine as TE

    calls = []

    def broken(*_a, **_k):
        calls.append(1)
        raise RuntimeError("builder ran out of workspace")

    monkeypatch.setattr(R, "tensorrt_unavailable_reason", lambda: None)  # as if TensorRT and a GPU were here
    monkeypatch.setattr(TE, "build_engine", broken)
    # a requested runtime that fails fails the build (issue 38) unless the recipe lets it: here it may
    validate = {"batch_sizes": [1], "warmup": 1, "iterations": 3, "may_fail": ["tensorrt"]}
    recipe, out = tiny_recipe(tmp_path, runtimes=["onnxruntime", "tensorrt"], validate=validate), tmp_path / "o"
    res = build(recipe, "--out", out)
    assert res.exit_code == 0, res.output
    assert "compile: RuntimeError: builder ran out of workspace (not recorded" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "compile" not in manifest["stages"] and "validate" in manifest["stages"]
    row = json.loads((out / "report.json").read_text())["runtimes"]["tensorrt"]
    assert row["status"] == "failed" and "out of workspace" in row["reason"]
    res = build(recipe, "--out", out)
    assert len(calls) == 2 and "score: inputs unchanged, skipped" in res.output  # compile ran again, not skipped


def test_tensorrt_version_comes_from_the_distribution_that_provides_the_module(tmp_path, monkeypatch):
    from amp_deploy.pipeline import manifest

    pkg, dist = tmp_path / "tensorrt", tmp_path / "tensorrt_cu13_bindings-11.4.0.106.dist-info"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_cu13_bindings\nVersion: 11.4.0.106\n")
    (dist / "top_level.txt").write_text("tensorrt\n")
    (dist / "RECORD").write_text("tensorrt/__init__.py,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_version() == "11.4.0.106"
    assert manifest.machine()["tensorrt"] == "11.4.0.106"  # so a TensorRT upgrade re-runs compile and validate
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    assert installed_version() is None


def test_the_ort_tensorrt_cache_is_one_folder_per_onnx_content(tiny_vit, tmp_path):
    a = export_onnx(tiny_vit.model, tmp_path / "a.onnx", tiny_vit.input_size, batch_min=1, batch_opt=2, batch_max=4)
    with torch.no_grad():
        tiny_vit.model.blocks[0].mlp.fc1.weight.mul_(0.5)  # re-pruned weights, same names and shapes
    b = export_onnx(tiny_vit.model, tmp_path / "b.onnx", tiny_vit.input_size, batch_min=1, batch_opt=2, batch_max=4)
    opts = [tensorrt_providers(tmp_path / "cache", p, True, ([1, 3, 32, 32], [2, 3, 32, 32], [4, 3, 32, 32]))[0][1]
            for p in (a, b, a)]
    assert opts[0]["trt_engine_cache_path"] != opts[1]["trt_engine_cache_path"]
    assert opts[0]["trt_engine_cache_path"] == opts[2]["trt_engine_cache_path"]
    assert opts[0]["trt_profile_max_shapes"] == "pixel_values:4x3x32x32"


def test_timing_caches_are_keyed_by_tensorrt_version_and_gpu(tmp_path):
    a = timing_cache_path(tmp_path, "10.13.3", (9, 0))
    assert a != timing_cache_path(tmp_path, "11.4.0", (9, 0)) != timing_cache_path(tmp_path, "10.13.3", (8, 9))
    assert a.parent == tmp_path


@pytest.mark.parametrize("n,lo,hi", [(10, 4, 8), (3, 4, 8), (16, 1, 8), (9, 8, 8), (1, 1, 1)])
def test_parity_batches_stay_inside_the_profile(n, lo, hi):
    seen = set()
    images = torch.randn(n, 2)
    ref = images * 2

    def run(x: np.ndarray) -> np.ndarray:
        assert lo <= len(x) <= hi, f"batch {len(x)} outside [{lo}, {hi}]"
        return x * 2

    for a, b in chunks(max(n, lo), lo, hi):
        seen |= set(range(a, b))
    assert seen == set(range(max(n, lo)))
    par = parity_of({"original": Runner(run), "pruned": Runner(run)}, images, {"original": ref, "pruned": ref}, (lo, hi))
    assert par["max_abs_err"] == 0 and par["original"]["images"] == max(n, lo)


def test_ort_trt_fp32_runs_with_tf32_and_gets_the_reduced_gate():
    row = {"precision": "tf32", "parity": {"original": {"max_abs_err": 1e-3, "cosine_min": 0.9999}}}
    assert parity_breaches({"runtimes": {"onnxruntime-trt": row}}, 1e-4, 0.99999, (5e-2, 0.999)) == []
    row["precision"] = "fp32"
    assert parity_breaches({"runtimes": {"onnxruntime-trt": row}}, 1e-4, 0.99999, (5e-2, 0.999))


def test_device_memory_uses_v2_even_when_it_is_zero_and_none_is_a_clear_error():
    class V2:
        device_memory_size_v2 = 0  # an engine that needs none: not a reason to reach for the removed v1

    class V1:
        device_memory_size = 123

    assert device_memory_bytes(V2()) == 0 and device_memory_bytes(V1()) == 123
    with pytest.raises(UserError, match="could not create a builder config"):
        _need(None, "a builder config")


def test_a_missing_cuda_library_is_named():
    log = ("Failed to load library libonnxruntime_providers_cuda.so with error: libcurand.so.10: cannot open shared "
           "object file: No such file or directory")
    assert missing_libraries(log) == ["libcurand.so.10"]


def test_bf16_exports_pass_the_full_onnx_check_at_opset_22(tiny_vit, tmp_path):
    import onnx

    path = export_onnx(tiny_vit.model, tmp_path / "b.onnx", tiny_vit.input_size, opset=22, batch_min=1, batch_opt=2,
                       batch_max=4, precision="bf16")
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
