"""Runtimes: what runs here runs for real; what cannot is skipped with its reason, never passed.

TensorRT and CUDA tests are marked and skipped where tensorrt or a GPU is missing."""

import json

import numpy as np
import onnx
import pytest
import torch

from amp_deploy.deploy.export import export_onnx, external_files
from amp_deploy.deploy.runtimes import (
    Unavailable,
    cuda_providers,
    onnxruntime_runner,
    tensorrt_providers,
    tensorrt_unavailable_reason,
    torch_runner,
)
from amp_deploy.deploy.tensorrt_engine import BuildSettings, check_sidecar
from amp_deploy.errors import UserError

from .conftest import FAST, QUICKSTART, build, has_trt, requires_cuda, requires_trt


@pytest.mark.skipif(has_trt(), reason="TensorRT can run here")
def test_without_tensorrt_the_report_says_skipped_and_why(quickstart):
    reason = tensorrt_unavailable_reason()
    assert reason and ("tensorrt" in reason or "CUDA" in reason)
    rep = json.loads((quickstart[0] / "report.json").read_text())
    assert rep["runtimes"]["tensorrt"] == {"status": "skipped", "reason": reason}
    assert not (quickstart[0] / "pruned.plan").exists()


def test_build_settings_follow_the_recipe():
    s = BuildSettings("fp16", 1, 8, 32, (3, 224, 224), 2048, 4, True)
    assert s.profile() == {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]}
    assert s.builder_flags(10) == []  # strongly typed: precision comes from the graph
    weak = BuildSettings("bf16", 1, 8, 32, (3, 224, 224), strongly_typed=False)
    assert weak.builder_flags(10) == ["BF16"]
    with pytest.raises(UserError, match="TensorRT 10"):
        weak.builder_flags(11)
    assert BuildSettings("fp32", 1, 1, 1, (3, 8, 8), strongly_typed=False).builder_flags(10) == []


def test_compile_settings_come_from_the_recipe_sections(tmp_path):
    from amp_deploy.pipeline.context import Context
    from amp_deploy.pipeline.stages import compile_settings
    from amp_deploy.recipe import load_recipe

    r = load_recipe(QUICKSTART, ["compile.precision=bf16", "export.opset=22", "compile.workspace_mib=512",
                               "export.batch.max=16"])
    s = compile_settings(Context.create(r, tmp_path, "cpu"), (3, 8, 8))
    assert (s.precision, s.workspace_mib, s.batch_max, s.input_shape) == ("bf16", 512, 16, (3, 8, 8))


def test_sidecar_mismatch_is_a_clear_error_not_a_crash():
    meta = {"tensorrt": "10.13.0", "compute_capability": "9.0", "gpu": "NVIDIA H100"}
    check_sidecar(meta, "10.13.0", "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(UserError, match=r"compute capability 9.0 \(NVIDIA H100\), this GPU is 8.9"):
        check_sidecar(meta, "10.13.0", "NVIDIA L4", (8, 9))
    with pytest.raises(UserError, match="built with TensorRT 10.13.0, this is 10.14.1"):
        check_sidecar(meta, "10.14.1", "NVIDIA H100", (9, 0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA provider may really run")
@pytest.mark.parametrize("kind", ["cuda", "trt"])
def test_gpu_providers_listed_but_not_got_are_skipped(tiny_vit, tmp_path, kind):
    path = export_onnx(tiny_vit.model, tmp_path / "m.onnx", tiny_vit.input_size, opset=18, batch_min=1, batch_opt=2,
                       batch_max=4)
    providers = cuda_providers() if kind == "cuda" else tensorrt_providers(tmp_path / "cache", path, True)
    with pytest.raises(Unavailable, match="did not give|could not start"):
        onnxruntime_runner(path, providers=providers)


def test_torch_and_onnxruntime_rows_compare_original_and_pruned(tmp_path):
    out = tmp_path / "out"
    res = build(QUICKSTART, "--out", out, *FAST, "runtimes=[onnxruntime, torch, onnxruntime-cuda]")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    for name in ("onnxruntime", "torch"):
        row = rep["runtimes"][name]
        assert row["status"] == "ok"
        assert set(row["latency_ms"]["original"]) == set(row["latency_ms"]["pruned"]) == {"1", "8"}
        assert row["memory"]["pruned"]["weights_bytes"] < row["memory"]["original"]["weights_bytes"]
    assert "parity" not in rep["runtimes"]["torch"]  # the reference itself
    cuda = rep["runtimes"]["onnxruntime-cuda"]
    if not torch.cuda.is_available():
        assert cuda["status"] == "skipped" and "CUDAExecutionProvider" in cuda["reason"]
    assert "### torch" in (out / "report.md").read_text()


def test_half_precision_export_keeps_layernorm_in_fp32(tiny_vit, tmp_path):
    path = export_onnx(tiny_vit.model, tmp_path / "h.onnx", tiny_vit.input_size, opset=18, batch_min=1, batch_opt=2, batch_max=4, precision="fp16")
    model = onnx.load(str(path))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(ln) == 2 * len(tiny_vit.sites) + 1
    assert all(inits.get(n.input[1]) == onnx.TensorProto.FLOAT for n in ln if n.input[1] in inits)
    assert onnx.TensorProto.FLOAT16 in inits.values()
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x = torch.randn(2, *tiny_vit.input_size)
    with torch.no_grad():
        ref = tiny_vit.model(x)
    try:
        out = onnxruntime_runner(path).run(x.half().numpy()).astype(np.float32)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"onnxruntime's CPU provider cannot run this fp16 graph here: {e}")
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(out), ref).min().item()
    assert cos >= 0.999


@pytest.mark.slow
def test_a_model_over_2gb_exports_with_external_data_and_keeps_parity(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", depth=1, img_size=32, embed_dim=1024, num_heads=8, mlp_ratio=272,
                              num_classes=10).eval()
    size = sum(p.numel() * 4 for p in model.parameters())
    assert size > 2**31
    path = export_onnx(model, tmp_path / "big.onnx", (3, 32, 32), opset=18, batch_min=1, batch_opt=2, batch_max=4)
    data = external_files(path)
    assert data and all(f.is_file() for f in data) and path.stat().st_size < 2**31
    assert sum(f.stat().st_size for f in data) >= size * 0.99
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(onnxruntime_runner(path).run(x.numpy()) - ref).max() <= 1e-4


@requires_cuda
def test_torch_runner_on_cuda_times_with_events(tiny_vit):
    from amp_deploy.measure.metrics import latency

    r = torch_runner(tiny_vit.model, device=torch.device("cuda"))
    x = torch.randn(4, *tiny_vit.input_size).numpy()
    st = latency({"m": r}, x, 2, 5)["m"]
    assert st["device"]["p50"] > 0 and st["p50"] >= st["device"]["min"]


@requires_cuda
def test_onnxruntime_cuda_provider_parity(tiny_vit, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime is a CPU build (no CUDA provider at all); install onnxruntime-gpu")
    path = export_onnx(tiny_vit.model, tmp_path / "m.onnx", tiny_vit.input_size, opset=18, batch_min=1, batch_opt=2,
                       batch_max=4)
    r = onnxruntime_runner(path, providers=cuda_providers())  # listed but unusable on a GPU machine: a failure
    assert r.info["providers"][0] == "CUDAExecutionProvider"
    x = torch.randn(3, *tiny_vit.input_size)
    with torch.no_grad():
        ref = tiny_vit.model(x).numpy()
    assert np.abs(r.run(x.numpy()) - ref).max() <= 1e-4


@requires_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_builds_runs_and_keeps_parity(tmp_path, precision):
    from amp_deploy.deploy.tensorrt_engine import TensorRTRunner

    out = tmp_path / "out"
    res = build(QUICKSTART, "--out", out, *FAST, "runtimes=[onnxruntime, tensorrt]", f"compile.precision={precision}")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    row = rep["runtimes"]["tensorrt"]
    assert row["status"] == "ok" and row["precision"] == precision, row
    meta = json.loads((out / "pruned.plan.json").read_text())
    assert meta["gpu"] and meta["plan_sha256_16"] and meta["profile"]["max"][0] == 32
    assert row["memory"]["pruned"]["device_peak_bytes"] > 0
    # the recipe's own gates: fp32 engines are references (TF32 off), fp16 ones get the reduced limits
    err, cos = (1e-4, 0.99999) if precision == "fp32" else (5e-2, 0.999)
    for k in ("original", "pruned"):
        assert row["parity"][k]["max_abs_err"] <= err and row["parity"][k]["cosine_min"] >= cos, row["parity"]
    assert list(out.glob("timing-trt*-sm*.cache"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"pruned.plan", "pruned.plan.json"} <= set(manifest["stages"]["compile"]["outputs"])
    runner = TensorRTRunner(out / "pruned.plan")
    with pytest.raises(UserError, match="outside the engine's profile"):
        runner(torch.zeros(33, 3, 8, 8))


@pytest.mark.slow
def test_torch_compile_row_runs_where_inductor_works(tmp_path):
    out = tmp_path / "out"
    res = build(QUICKSTART, "--out", out, *FAST, "runtimes=[torch-compile]", "validate.batch_sizes=[1]")
    assert res.exit_code == 0, res.output
    row = json.loads((out / "report.json").read_text())["runtimes"]["torch-compile"]
    if row["status"] != "ok":  # inductor needs a C++ compiler; without one the row must say why
        assert row["status"] == "failed" and row["reason"]
        pytest.skip(f"torch.compile does not work here: {row['reason']}")
    assert row["parity"]["pruned"]["max_abs_err"] <= 1e-4
