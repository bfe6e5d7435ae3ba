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
from amp_deploy.measure.metrics import count_flops
from amp_deploy.prune.families import find_sites, load_model
from amp_deploy.prune.rebuild import apply_widths, keep_top
from amp_deploy.prune.score import DEFAULT_TEMPERATURE, Divergence, default_view, loss_fn, taylor_scores
from amp_deploy.prune.search import adaptive_widths, uniform_widths
from amp_deploy.prune.shape import shapes_of
from tests.conftest import assert_not_degenerate, spread_init

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
    # DINOv2's processor crops 224 whatever the config says: a 32-pixel crop keeps the test small
    **{f"hf_Dinov2Model{tag}": ("transformers", "Dinov2Model", {"config": {**HF_SMALL, **extra}, "processor": {
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}})
       for tag, extra in [("", {}), ("_swiglu", {"use_swiglu_ffn": True})]},
    "open_clip_vit": ("open_clip", "ViT-B-32", {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}),
}


# timm families run in both forms: a classifier head (num_classes 10) and the embedding (num_classes 0)
FORMS = [(key, form) for key, (source, _, _) in FAMILIES.items()
         for form in (("head", "embedding") if source == "timm" else ("own",))]


def _load(key, form="own", spread=True):
    source, name, kwargs = FAMILIES[key]
    if form != "own":
        kwargs = {**kwargs, "num_classes": 10 if form == "head" else 0}
    loaded = load_model(source, name, False, kwargs)
    if spread:
        spread_init(loaded.model)
    return loaded


def _floor(widths, steps):
    """The smallest width a bisection of `steps` steps can reach on [1, h]."""
    out = []
    for h in widths:
        left, right = -1, h - 1
        for _ in range(steps):
            mid = (left + right) // 2
            if mid <= left:
                break
            right = mid
        out.append(right + 1)
    return out


@pytest.mark.parametrize("key,form", FORMS)
def test_family_prunes_round_trips_and_exports(key, form, tmp_path):
    loaded = _load(key, form)
    original = loaded.widths()
    reference = copy.deepcopy(loaded)
    data = load_synthetic_data(calibration=8, validation=8, holdout=4, seed=0, transform=loaded.transform, size=loaded.input_size[1:])
    assert next(data.calibration.batches(8))[0].shape[1:] == loaded.input_size  # a stream of the model's input
    view = default_view(loaded.output)
    loss = loss_fn("entropy", view, DEFAULT_TEMPERATURE[view])
    scores = taylor_scores(loaded, data.calibration.batches(4), loss, torch.device("cpu"))["abs"]
    assert [len(s) for s in scores] == original
    with torch.no_grad():
        assert_not_degenerate(reference.model(data.validation.images), scores)

    search = Divergence(view, DEFAULT_TEMPERATURE[view])
    # how far every block cut to the floor moves the model: ~0 would make any search pass; the
    # threshold is a small part of it, so a search that means something cannot reach the floor
    floored = copy.deepcopy(reference)
    apply_widths(floored, scores, _floor(original, 4))
    with torch.no_grad():
        x = data.validation.images
        floor_loss = float(search(floored.model(x), None, reference.model(x)).mean())
    assert floor_loss > 1e-8, f"the model's output does not depend on its MLPs: {floor_loss:.2e}"
    res = adaptive_widths(loaded, scores, data.validation, batch_size=8, loss=search,
                          threshold=floor_loss / (4 * len(original)), steps=4)
    assert all(1 <= w <= h for w, h in zip(res.widths, original)) and loaded.widths() == res.widths
    assert_not_degenerate(widths=res.widths, floor=_floor(original, 4))
    for w, h in zip(uniform_widths(original, 0.5, 8), original):
        assert (w % 8 == 0 or w == h) and abs(w - h / 2) <= 4

    widths = [max(1, h // 3) for h in original]  # ragged round trip on fixed widths
    pruned = copy.deepcopy(reference)
    apply_widths(pruned, scores, widths)
    _check_same_neurons(reference, pruned, scores, widths)
    assert 0 < count_flops(pruned.model, pruned.input_size) < count_flops(reference.model, reference.input_size)
    save_pruned(pruned, tmp_path / "p.safetensors", shapes_of(original))
    back = load_pruned(tmp_path / "p.safetensors")
    x = data.holdout.images
    with torch.no_grad():
        ref_out = pruned.model(x)
        assert torch.equal(back(x), ref_out)
    path = export_onnx(pruned.model, tmp_path / "p.onnx", pruned.input_size, opset=18, batch_min=1, batch_opt=2, batch_max=4)
    out = onnxruntime_runner(path).run(x.numpy())
    assert np.abs(out - ref_out.numpy()).max() <= 1e-4


def test_a_degenerate_random_init_fails_the_family_check():
    """timm's DINOv2 factory as it comes (LayerScale 1e-5, class-token pooling): every image gets the
    same embedding, so a family test on it would pass whatever pruning did; the check refuses it."""
    loaded = _load("dinov2_reg4", "embedding", spread=False)
    data = load_synthetic_data(calibration=8, validation=8, holdout=4, seed=0, transform=loaded.transform,
                               size=loaded.input_size[1:])
    with torch.no_grad(), pytest.raises(AssertionError, match="features all alike"):
        assert_not_degenerate(loaded.model(data.validation.images))


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
