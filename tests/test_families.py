"""Every model family users run: random-init, depth reduced, pruned adaptively and uniformly,
round-tripped through safetensors and ONNX."""

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
from amp_deploy.errors import UserError
from amp_deploy.prune.families import find_sites, load_model
from amp_deploy.prune.rebuild import apply_widths, keep_top
from amp_deploy.prune.score import loss_fn, taylor_scores
from amp_deploy.prune.search import adaptive_widths, uniform_widths

HF_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "image_size": 32, "patch_size": 8}
FAMILIES = {
    "vit": ("timm", "vit_small_patch16_224", {"depth": 2, "img_size": 32, "embed_dim": 64, "num_heads": 2}),
    "deit": ("timm", "deit_tiny_patch16_224", {"depth": 2, "img_size": 32}),
    "dinov2_reg4": ("timm", "vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 28, "embed_dim": 64, "num_heads": 2}),
    "dinov2_giant_swiglu_packed": ("timm", "vit_giant_patch14_dinov2", {"depth": 2, "img_size": 28, "embed_dim": 96, "num_heads": 2}),
    "eva02_tiny_glu": ("timm", "eva02_tiny_patch14_224", {"depth": 2, "img_size": 28}),
    "eva02_base_swiglu_norm": ("timm", "eva02_base_patch14_224", {"depth": 2, "img_size": 28, "embed_dim": 64, "num_heads": 2}),
    # towers users run today (issue 12), from timm's own factories: SigLIP 2's fixed-resolution towers are
    # these architectures with `.v2_webli` weights; DINOv3 (RoPE, and the 7B's SwiGLU), EVA02-CLIP, AIMv2
    "siglip": ("timm", "vit_base_patch16_siglip_224", {"depth": 2, "img_size": 32, "embed_dim": 64, "num_heads": 2}),
    "dinov3": ("timm", "vit_base_patch16_dinov3", {"depth": 2, "img_size": 32, "embed_dim": 64, "num_heads": 2}),
    "dinov3_7b_swiglu": ("timm", "vit_7b_patch16_dinov3", {"depth": 2, "img_size": 32, "embed_dim": 64, "num_heads": 2}),
    "eva02_clip": ("timm", "eva02_base_patch16_clip_224", {"depth": 2, "img_size": 32, "embed_dim": 64, "num_heads": 2}),
    "aimv2": ("timm", "aimv2_large_patch14_224", {"depth": 2, "img_size": 28, "embed_dim": 64, "num_heads": 2}),
    # Hugging Face transformers towers, built from their configs (the optional extra)
    **{f"hf_{name}{tag}": ("transformers", name, {"config": {**HF_SMALL, **extra}}) for name, tag, extra in [
        ("ViTModel", "", {}), ("ViTForImageClassification", "", {"num_labels": 10}), ("CLIPVisionModel", "", {}),
        ("CLIPVisionModelWithProjection", "", {"projection_dim": 32}), ("Dinov2Model", "", {}),
        ("Dinov2Model", "_swiglu", {"use_swiglu_ffn": True}), ("SiglipVisionModel", "", {})]},
    "open_clip_vit": ("open_clip", "ViT-B-32", {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}),
}


def _load(key):
    source, name, kwargs = FAMILIES[key]
    loaded = load_model(source, name, False, kwargs)
    for m in loaded.model.modules():  # non-trivial norms over hidden neurons, so slicing them shows
        if isinstance(m, nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return loaded


@pytest.mark.parametrize("key", FAMILIES)
def test_family_prunes_round_trips_and_exports(key, tmp_path):
    loaded = _load(key)
    original = loaded.widths()
    reference = copy.deepcopy(loaded)
    data = load_synthetic_data(calibration=8, validation=8, holdout=4, seed=0, transform=loaded.transform, size=loaded.input_size[1:])
    assert next(data.calibration.batches(8))[0].shape[1:] == loaded.input_size  # a stream of the model's input
    loss = loss_fn("entropy", loaded.output, 15.0)
    scores = taylor_scores(loaded, data.calibration.batches(4), loss, torch.device("cpu"))["abs"]
    assert [len(s) for s in scores] == original

    res = adaptive_widths(loaded, scores, data.validation, batch_size=4, loss=loss, threshold=0.05, steps=4)
    assert all(1 <= w <= h for w, h in zip(res.widths, original)) and loaded.widths() == res.widths
    for w, h in zip(uniform_widths(original, 0.5, 8), original):
        assert (w % 8 == 0 or w == h) and abs(w - h / 2) <= 4

    widths = [max(1, h // 3) for h in original]  # ragged round trip on fixed widths
    pruned = copy.deepcopy(reference)
    apply_widths(pruned, scores, widths)
    _check_same_neurons(reference, pruned, scores, widths)
    save_pruned(pruned, tmp_path / "p.safetensors", original)
    back = load_pruned(tmp_path / "p.safetensors")
    x = data.holdout.images
    with torch.no_grad():
        ref_out = pruned.model(x)
        assert torch.equal(back(x), ref_out)
    path = export_onnx(pruned.model, tmp_path / "p.onnx", pruned.input_size, opset=18, batch_min=1, batch_opt=2, batch_max=4)
    out = onnxruntime_runner(path).run(x.numpy())
    assert np.abs(out - ref_out.numpy()).max() <= 1e-4


def _check_same_neurons(ref, pruned, scores, widths):
    """Gate and value halves, and a norm over hidden neurons, keep the same neuron indices."""
    for i, site in enumerate(ref.sites):
        keep = keep_top(scores[i], widths[i])
        old, new = ref.mlp_modules(i), pruned.mlp_modules(i)
        h = old["fc_out"].in_features
        rows = torch.cat([keep, keep + h]) if site.packed else keep
        torch.testing.assert_close(new["fc_in"].weight, old["fc_in"].weight[rows], rtol=0, atol=0)
        torch.testing.assert_close(new["fc_out"].weight, old["fc_out"].weight[:, keep], rtol=0, atol=0)
        if site.gate:
            torch.testing.assert_close(new["gate"].weight, old["gate"].weight[keep], rtol=0, atol=0)
        if site.norm:
            torch.testing.assert_close(new["norm"].weight, old["norm"].weight[keep], rtol=0, atol=0)


def test_sites_of_the_gated_families():
    giant = _load("dinov2_giant_swiglu_packed").sites[0]
    assert giant.packed and giant.gate is None
    eva = _load("eva02_base_swiglu_norm").sites[0]
    assert eva.gate == "mlp.fc1_g" and eva.fc_in == "mlp.fc1_x" and eva.norm == "mlp.norm"
    clip = _load("open_clip_vit")
    assert clip.sites[0].fc_in == "mlp.c_fc" and clip.output == "embedding" and clip.blocks == "transformer.resblocks"


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([Layer(), Layer()])

    def forward(self, x):
        for layer in self.encoder:
            x = layer(x)
        return x


def test_unknown_model_needs_a_spec_and_the_spec_works():
    with pytest.raises(UserError, match="model.mlp_sites"):
        find_sites(Unknown())
    path, sites = find_sites(Unknown(), {"blocks": "encoder", "fc_in": "up", "fc_out": "down"})
    assert path == "encoder" and len(sites) == 2 and sites[0].fc_out == "down"
    with pytest.raises(UserError, match="model.mlp_sites.fc_out: block 0 has no submodule 'nope'"):
        find_sites(Unknown(), {"blocks": "encoder", "fc_in": "up", "fc_out": "nope"})


def test_open_clip_weights_tag_is_checked_before_any_download():
    with pytest.raises(UserError, match="has no open_clip weights 'nope'; known: openai"):
        load_model("open_clip", "ViT-B-32", True, {"pretrained": "nope"})


def test_the_transformers_extra_missing_is_one_clear_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'amp-deploy\[transformers\]'"):
        load_model("transformers", "Dinov2Model", False, {"config": {}})
