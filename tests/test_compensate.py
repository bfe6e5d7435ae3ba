"""Compensation (prune.compensate): the closed-form re-fit of the layer that reads the cut units.

The arithmetic on plain tensors (nothing cut returns the layer; a re-fit beats the weights as cut on
tokens it never saw; the guard declines a re-fit that does worse there), then every family the tool
prunes, from the real factories: re-fitted MLPs and attention projections, the model's output closer
to the original's on held-out images, `load_pruned` rebuilding it exactly, ONNX parity."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from amp_deploy import load_pruned
from amp_deploy.checkpoint import save_pruned
from amp_deploy.data import load_synthetic_data
from amp_deploy.deploy.export import export_onnx
from amp_deploy.deploy.runtimes import onnxruntime_runner
from amp_deploy.prune.compensate import Compensator, Stats, collect, gram_error, refit_gram, refit_samples
from amp_deploy.prune.rebuild import apply_shapes
from amp_deploy.prune.shape import BlockShape
from tests.test_families import _load


def _gram(x: torch.Tensor) -> torch.Tensor:
    s = Stats()
    s.add(x, sample=False)
    return s.gram


def test_nothing_cut_returns_the_layer_and_a_refit_beats_the_cut_on_unseen_tokens():
    torch.manual_seed(0)
    layer = nn.Linear(48, 16)
    mix = torch.randn(48, 48) / 7  # correlated units: what the kept ones carry of the cut ones
    fit, held = torch.randn(2000, 48) @ mix + 0.3, torch.randn(500, 48) @ mix + 0.3
    g, gh = _gram(fit), _gram(held)
    w, b = refit_gram(layer.weight, layer.bias, torch.arange(48), g)
    torch.testing.assert_close(w, layer.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, layer.bias, atol=1e-5, rtol=1e-5)
    keep = torch.arange(0, 48, 2)
    cut_w, cut_b = layer.weight[:, keep], layer.bias
    as_cut = gram_error(layer.weight, layer.bias, keep, cut_w, cut_b, gh)
    for mode in ("bias", "ridge"):
        w, b = refit_gram(layer.weight, layer.bias, keep, g, mode=mode)
        assert gram_error(layer.weight, layer.bias, keep, w, b, gh) < as_cut
    # the Gram error is the mean squared error on the tokens themselves
    w, b = refit_gram(layer.weight, layer.bias, keep, g)
    with torch.no_grad():
        direct = ((layer(held) - (held[:, keep] @ w.T + b)) ** 2).sum(1).mean()
    assert abs(float(direct) - gram_error(layer.weight, layer.bias, keep, w, b, gh)) < 1e-3 * float(direct)


def test_the_norm_path_reads_what_the_cut_layer_reads():
    torch.manual_seed(0)
    layer, norm = nn.Linear(32, 8), nn.LayerNorm(32)
    mix = torch.randn(32, 32) / 5  # correlated units
    z = torch.randn(1000, 32) @ mix + 1.0
    w, b = refit_samples(layer.weight, layer.bias, torch.arange(32), z, norm, norm)
    torch.testing.assert_close(w, layer.weight, atol=1e-5, rtol=1e-5)
    keep = torch.arange(16)
    cut_norm = nn.LayerNorm(16)
    with torch.no_grad():
        cut_norm.weight.copy_(norm.weight[keep])
        cut_norm.bias.copy_(norm.bias[keep])
    w, b = refit_samples(layer.weight, layer.bias, keep, z, norm, cut_norm)
    held = torch.randn(300, 32) @ mix + 1.0
    with torch.no_grad():
        want = layer(norm(held))
        fitted = cut_norm(held[:, keep]) @ w.T + b
        as_cut = cut_norm(held[:, keep]) @ layer.weight[:, keep].T + layer.bias
    assert (want - fitted).pow(2).mean() < 0.8 * (want - as_cut).pow(2).mean()


def test_the_guard_declines_a_refit_that_does_worse_on_held_out_tokens():
    """Fitted where the cut units copy the kept ones, judged where they do not: the re-fit moves the
    cut units' weight onto the kept ones, which only helps where the copy holds, so it is declined."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    base = torch.randn(400, 4)
    fit = torch.cat([base, base], 1)  # units 4..7 copy 0..3 on the calibration tokens
    held = torch.randn(400, 8)  # independent on the held-out ones
    fit_stats = [type("B", (), {"mlp": Stats(gram=_gram(fit), tokens=400), "attn": None})()]
    held_stats = [type("B", (), {"mlp": Stats(gram=_gram(held), tokens=400), "attn": None})()]
    comp = Compensator(fit_stats, held_stats, "ridge", 1e-4)
    keep = torch.arange(4)
    cut = {"fc_out": nn.Linear(4, 4)}
    with torch.no_grad():
        cut["fc_out"].weight.copy_(layer.weight[:, keep])
        cut["fc_out"].bias.copy_(layer.bias)
    got = comp.mlp(0, {"fc_out": layer}, keep, cut)
    d = comp.decisions[(0, "mlp")]
    assert d.declined and d.error_refit > d.error_cut and got["fc_out"] is cut["fc_out"]
    # judged on tokens like its own, the same re-fit is kept
    comp = Compensator(fit_stats, fit_stats, "ridge", 1e-4)
    got = comp.mlp(0, {"fc_out": layer}, keep, cut)
    assert not comp.decisions[(0, "mlp")].declined and got["fc_out"] is not cut["fc_out"]


FAMILIES = ["vit", "dinov2_reg4", "dinov2_giant_swiglu_packed", "eva02_base_swiglu_norm", "siglip",
            "hf_Dinov2Model", "hf_Dinov2Model_swiglu", "hf_CLIPVisionModel", "open_clip_vit"]


@pytest.mark.parametrize("key", FAMILIES)
def test_every_family_refits_rebuilds_and_exports(key, tmp_path):
    loaded = _load(key)
    data = load_synthetic_data(calibration=48, validation=16, holdout=8, seed=0, transform=loaded.transform,
                               size=loaded.input_size[1:])
    model = loaded.model.eval()
    heads = loaded.heads() is not None

    def batches(split):
        return (x for x, _ in split.batches(8))

    fit = collect(loaded, batches(data.calibration), torch.device("cpu"), heads, tokens_per_image=1000)
    check = collect(loaded, batches(data.validation), torch.device("cpu"), heads, tokens_per_image=1000)
    for i, site in enumerate(loaded.sites):  # nothing cut: the re-fit (no shortcut) returns the layer
        fc_out = loaded.mlp_modules(i)["fc_out"]
        everything = torch.arange(fc_out.in_features)
        if site.norm:
            norm = loaded.mlp_modules(i)["norm"]
            w, b = refit_samples(fc_out.weight, fc_out.bias, everything, fit[i].mlp.sample(), norm, norm)
        else:
            w, b = refit_gram(fc_out.weight, fc_out.bias, everything, fit[i].mlp.gram)
        torch.testing.assert_close(w, fc_out.weight, atol=1e-4, rtol=1e-4)
    shapes = [BlockShape(s.width // 2, max(1, s.heads // 2) if heads else None) for s in loaded.shapes()]
    scores = [torch.rand(s.width) for s in loaded.shapes()]
    head_scores = [torch.rand(s.heads) for s in loaded.shapes()] if heads else None
    cut, refit = copy.deepcopy(loaded), copy.deepcopy(loaded)
    apply_shapes(cut, shapes, scores, head_scores)
    comp = Compensator(fit, check, "ridge")
    apply_shapes(refit, shapes, scores, head_scores, comp)
    assert refit.shapes() == cut.shapes() == shapes
    assert len(comp.decisions) >= len(shapes)  # every block's MLP (and attention) was re-fitted or declined
    x = data.holdout.images  # images neither the fit nor the guard saw
    with torch.no_grad():
        want, as_cut, got = model(x), cut.model.eval()(x), refit.model.eval()(x)
    assert (got - want).pow(2).mean() <= (as_cut - want).pow(2).mean()
    save_pruned(refit, tmp_path / "p.safetensors", loaded.shapes())
    back = load_pruned(tmp_path / "p.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), got)
    if key in ("vit", "open_clip_vit", "eva02_base_swiglu_norm"):
        path = export_onnx(refit.model, tmp_path / "p.onnx", refit.input_size, opset=18, batch_min=1, batch_opt=2,
                           batch_max=8)
        out = onnxruntime_runner(path).run(x.numpy())
        assert np.abs(out - got.numpy()).max() <= 1e-4
