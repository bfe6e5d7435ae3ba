"""Ragged rebuild, the safetensors round trip, and ONNX parity."""

import numpy as np
import pytest
import torch

from amp_deploy import load_pruned
from amp_deploy.checkpoint import save_pruned
from amp_deploy.deploy.export import export_onnx
from amp_deploy.deploy.runtimes import onnxruntime_runner
from amp_deploy.prune.rebuild import apply_widths, keep_top
from amp_deploy.prune.shape import shapes_of


def _prune_randomly(loaded, seed=0):
    gen = torch.Generator().manual_seed(seed)
    original = loaded.widths()
    scores = [torch.rand(h, generator=gen) for h in original]
    widths = [int(torch.randint(1, h + 1, (1,), generator=gen)) for h in original]
    return original, scores, widths


def test_slicing_equals_masking_the_removed_neurons(tiny_vit):
    x = torch.randn(3, *tiny_vit.input_size)
    original, scores, widths = _prune_randomly(tiny_vit)
    masks = []
    for i, (s, w) in enumerate(zip(scores, widths)):
        mask = torch.zeros(original[i])
        mask[keep_top(s, w)] = 1
        masks.append(tiny_vit.mlp_modules(i)["fc_out"].register_forward_pre_hook(
            lambda _m, args, mask=mask: (args[0] * mask,)))
    with torch.no_grad():
        masked = tiny_vit.model(x)
    for h in masks:
        h.remove()
    apply_widths(tiny_vit, scores, widths)
    assert tiny_vit.widths() == widths
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit.model(x), masked, atol=1e-5, rtol=1e-5)


def test_ragged_round_trip_is_bit_identical(tiny_vit, tmp_path):
    original, scores, widths = _prune_randomly(tiny_vit, seed=1)
    assert len(set(widths)) > 1  # ragged
    apply_widths(tiny_vit, scores, widths)
    save_pruned(tiny_vit, tmp_path / "p.safetensors", shapes_of(original))
    model = load_pruned(tmp_path / "p.safetensors")
    x = torch.randn(2, *tiny_vit.input_size)
    with torch.no_grad():
        assert torch.equal(model(x), tiny_vit.model(x))
    assert [b.mlp.fc1.out_features for b in model.blocks] == widths
    assert not model.training


def test_onnx_parity_of_a_pruned_model(tiny_vit, tmp_path):
    original, scores, widths = _prune_randomly(tiny_vit, seed=2)
    apply_widths(tiny_vit, scores, widths)
    path = export_onnx(tiny_vit.model, tmp_path / "p.onnx", tiny_vit.input_size, opset=18, batch_min=1, batch_opt=4, batch_max=8)
    runner = onnxruntime_runner(path)
    assert runner.info["providers"][0] == "CPUExecutionProvider"
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, *tiny_vit.input_size)
        with torch.no_grad():
            ref = tiny_vit.model(x).numpy()
        out = runner.run(x.numpy())
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4


def test_onnx_has_one_layernorm_node_per_norm(tiny_vit, tmp_path):
    import onnx

    path = export_onnx(tiny_vit.model, tmp_path / "o.onnx", tiny_vit.input_size, opset=18, batch_min=1, batch_opt=2, batch_max=4)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("LayerNormalization") == 2 * len(tiny_vit.sites) + 1
    assert "ReduceMean" not in ops or ops.count("LayerNormalization") > 0


@pytest.mark.parametrize("exporter", ["torchscript"])
def test_other_exporter_is_selectable(tiny_vit, tmp_path, exporter):
    path = export_onnx(tiny_vit.model, tmp_path / "t.onnx", tiny_vit.input_size, opset=17, batch_min=1, batch_opt=2, batch_max=4, exporter=exporter)
    x = torch.randn(2, *tiny_vit.input_size)
    with torch.no_grad():
        ref = tiny_vit.model(x).numpy()
    assert np.abs(onnxruntime_runner(path).run(x.numpy()) - ref).max() <= 1e-4
