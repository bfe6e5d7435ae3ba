"""Attention heads: scored with the neurons (a gate per head), cut with ragged counts per block,
searched beside the widths, and round-tripped through safetensors and ONNX."""

import copy

import numpy as np
import pytest
import torch

from amp_deploy import load_pruned
from amp_deploy.checkpoint import load_pruned_model, save_pruned
from amp_deploy.data import load_synthetic_data
from amp_deploy.deploy.export import export_onnx
from amp_deploy.deploy.runtimes import onnxruntime_runner
from amp_deploy.prune.rebuild import apply_heads, apply_widths, head_channels, keep_top, set_attention
from amp_deploy.prune.score import DEFAULT_TEMPERATURE, Divergence, default_view, loss_fn, taylor_scores
from amp_deploy.prune.search import adaptive_widths
from tests.conftest import assert_not_degenerate, read_search
from tests.test_families import FAMILIES, _load

HEADED = list(FAMILIES)  # every family the tool prunes has heads it can cut


def _data(loaded, n=8):
    return load_synthetic_data(calibration=n, validation=n, holdout=4, seed=0, transform=loaded.transform,
                               size=loaded.input_size[1:])


def _loss(loaded):
    view = default_view(loaded.output)
    return loss_fn("entropy", view, DEFAULT_TEMPERATURE[view])


def _direct_head_scores(loaded, batches, loss):
    """A gate per image and head (and per token, for the token variant) multiplying each head's output
    at the input of the output projection; the Taylor scores are their gradients, by autograd."""
    sites, heads = loaded.attn, loaded.heads()
    sums = {k: [torch.zeros(h) for h in heads] for k in ("abs", "token", "signed")}
    loaded.model.requires_grad_(False)
    for x, labels in batches:
        gates, hooks = [], []
        for i, site in enumerate(sites):
            def hook(_m, args, i=i, hd=site.head_dim, gates=gates):
                a = args[0]
                m = torch.ones(*a.shape[:-1], heads[i], requires_grad=True)
                gates.append((i, m))
                return ((a.unflatten(-1, (heads[i], hd)) * m[..., None]).flatten(-2),)
            hooks.append(loaded.attn_modules(i)["proj"].register_forward_pre_hook(hook))
        try:
            loss(loaded.model(x), labels).mean().backward()
        finally:
            for h in hooks:
                h.remove()
        for i, m in gates:
            g = m.grad  # (images, tokens, heads): the per-token gates; a per-image gate's gradient is their sum
            per_image = g.sum(1)
            sums["abs"][i] += per_image.abs().mean(0)
            sums["signed"][i] += per_image.mean(0)
            sums["token"][i] += g.flatten(0, 1).abs().mean(0)
    n = len(batches)
    return {k: [t / n for t in v] for k, v in sums.items()}


@pytest.mark.parametrize("key", ["vit", "eva02_tiny_glu", "eva02_clip", "open_clip_vit", "hf_Dinov2Model",
                                 "hf_CLIPVisionModel"])
def test_head_scores_equal_an_explicit_gate_per_head(key):
    loaded = _load(key)
    data = _data(loaded)
    batches = list(data.calibration.batches(4))
    got = taylor_scores(loaded, batches, _loss(loaded), torch.device("cpu"))
    want = _direct_head_scores(copy.deepcopy(loaded), batches, _loss(loaded))
    assert_not_degenerate(scores=got["heads.abs"])
    for kind in ("abs", "token", "signed"):
        for a, b in zip(got[f"heads.{kind}"], want[kind]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert [len(s) for s in got["heads.abs"]] == loaded.heads()


@pytest.mark.parametrize("key", HEADED)
def test_heads_cut_ragged_round_trip_and_export(key, tmp_path):
    loaded = _load(key)
    reference = copy.deepcopy(loaded)
    data = _data(loaded)
    x = data.holdout.images
    full = loaded.heads()
    apply_heads(loaded, None, full)  # every head kept: the model is the original
    for i in range(len(full)):  # and so is each attention put back whole (an EVA one runs its ragged forward)
        set_attention(loaded, i, loaded.attn_modules(i))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference.model(x))
    scores = taylor_scores(loaded, data.calibration.batches(4), _loss(loaded), torch.device("cpu"))
    heads = [max(1, h - 1 - i % 2) for i, h in enumerate(full)]  # ragged, at least one head
    widths = [max(1, w // 2) for w in loaded.widths()]
    apply_widths(loaded, scores["abs"], widths)
    apply_heads(loaded, scores["heads.abs"], heads)
    assert loaded.heads() == heads and loaded.widths() == widths
    for i, site in enumerate(loaded.attn):  # the kept heads' own rows and columns
        keep = head_channels(keep_top(scores["heads.abs"][i], heads[i]), site.head_dim)
        old, new = reference.attn_modules(i), loaded.attn_modules(i)
        torch.testing.assert_close(new["proj"].weight, old["proj"].weight[:, keep], rtol=0, atol=0)
        if "qkv" in old:
            inner = old["proj"].in_features
            rows = torch.cat([keep, keep + inner, keep + 2 * inner])
            torch.testing.assert_close(new["qkv"].weight, old["qkv"].weight[rows], rtol=0, atol=0)
        else:
            for k in ("q", "k", "v"):
                torch.testing.assert_close(new[k].weight, old[k].weight[keep], rtol=0, atol=0)
        for b in site.biases:  # EVA's q/k/v biases beside a bias-free packed qkv
            torch.testing.assert_close(new[b], old[b][keep], rtol=0, atol=0)
    with torch.no_grad():
        out = loaded.model(x)
        assert out.shape == reference.model(x).shape and torch.isfinite(out).all()
        assert not torch.allclose(out, reference.model(x), atol=1e-3)  # heads really went
    save_pruned(loaded, tmp_path / "p.safetensors", reference.shapes())
    back = load_pruned(tmp_path / "p.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), out)
    path = export_onnx(loaded.model, tmp_path / "p.onnx", loaded.input_size, opset=18, batch_min=1, batch_opt=2,
                       batch_max=4)
    assert np.abs(onnxruntime_runner(path).run(x.numpy()) - out.numpy()).max() <= 1e-4


def test_the_search_settles_heads_after_widths_and_chains_the_loss(digits_model):
    loaded, reference = digits_model, copy.deepcopy(digits_model)
    from amp_deploy.data import load_digits_data

    data = load_digits_data(calibration=128, validation=64, holdout=32, seed=0, transform=loaded.transform)
    scores = taylor_scores(loaded, data.calibration.batches(64), _loss(loaded), torch.device("cpu"))
    view = default_view(loaded.output)
    search = Divergence(view, DEFAULT_TEMPERATURE[view])
    res = adaptive_widths(loaded, scores["abs"], data.validation, batch_size=64, loss=search, threshold=0.01,
                          steps=6, head_scores=scores["heads.abs"])
    assert res.heads == loaded.heads() and all(1 <= h <= 4 for h in res.heads)
    assert len(res.head_steps) == len(res.heads) and all(res.head_steps)
    assert min(res.heads) < 4  # something was cut at this threshold (the digits ViT has spare heads)
    for i, trace in enumerate(res.head_steps):  # the fewest heads the bisection accepted, or all of them
        accepted = [h for h, _, ok in trace if ok]
        assert all(1 <= h < 4 for h, _, _ in trace) and res.heads[i] == (min(accepted) if accepted else 4)
    # no heads asked: the search is the MLP search alone, unchanged
    plain = adaptive_widths(copy.deepcopy(reference), scores["abs"], data.validation, batch_size=64, loss=search,
                            threshold=0.01, steps=6)
    assert plain.heads is None and plain.head_steps == []


def test_a_build_with_heads_reports_and_reloads_them(tmp_path):
    import json

    from typer.testing import CliRunner

    from amp_deploy.cli import app
    from tests.conftest import FAST, build, tiny_recipe

    recipe = tiny_recipe(tmp_path, prune={"threshold": 0.05, "steps": 3, "heads": True, "target_params": 0.6})
    out = tmp_path / "out"
    res = build(recipe, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    search = read_search(out)
    assert rep["heads"]["pruned"] == search["heads"] and rep["heads"]["original"] == search["original_heads"]
    assert rep["params"]["pruned"] <= 0.6 * rep["params"]["original"]
    back = load_pruned(out / "pruned.safetensors")
    from amp_deploy.prune.families import find_attn_sites, find_sites

    blocks = back.get_submodule(find_sites(back)[0])
    sites = find_attn_sites(blocks)
    assert [b.get_submodule(s.proj).in_features // s.head_dim for b, s in zip(blocks, sites)] == search["heads"]
    md = (out / "report.md").read_text()
    if search["heads"] != search["original_heads"]:
        assert "attention heads per block" in md and "attention heads" in res.output
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "heads" in shown.output, shown.output
    # it resumes like every build: nothing changed, nothing runs again; the pruned weights lost, the
    # stages from the rebuild on run again onto the same shapes (the scores and the search are kept)
    again = build(recipe, "--out", out, *FAST)
    assert again.exit_code == 0, again.output
    for stage in ("score", "search", "rebuild", "export", "validate"):
        assert f"{stage}: inputs unchanged, skipped" in again.output, again.output
    (out / "pruned.safetensors").unlink()
    (out / "pruned.before_distill.safetensors").unlink(missing_ok=True)
    again = build(recipe, "--out", out, *FAST)
    assert again.exit_code == 0, again.output
    assert "search: inputs unchanged, skipped" in again.output and "rebuild: inputs unchanged" not in again.output
    assert read_search(out)["shapes"] == search["shapes"] and load_pruned_model(out / "pruned.safetensors").shapes() \
        == [tuple(s) for s in search["shapes"]]


def test_head_loss_curves_equal_a_direct_evaluation_of_each_block_cut_alone(digits_model):
    from amp_deploy.data import load_digits_data
    from amp_deploy.prune import budget as B
    from amp_deploy.prune.search import model_losses

    loaded = digits_model
    data = load_digits_data(calibration=64, validation=32, holdout=8, seed=0, transform=loaded.transform)
    scores = taylor_scores(loaded, data.calibration.batches(32), _loss(loaded), torch.device("cpu"))
    view = default_view(loaded.output)
    search = Divergence(view, DEFAULT_TEMPERATURE[view])
    cands, hcands = [[128, 256]] * 4, [[1, 2, 3, 4]] * 4
    curves = B.loss_curves(loaded, scores["abs"], data.validation, cands, loss=search, batch_size=16,
                           head_scores=scores["heads.abs"], head_candidates=hcands)
    assert loaded.heads() == [4] * 4 and loaded.widths() == [256] * 4  # left whole
    assert curves.heads == hcands and all(row[-1] == curves.base_loss for row in curves.head_losses)
    for i, h in [(0, 1), (2, 3), (3, 2)]:
        direct = copy.deepcopy(loaded)
        apply_heads(direct, scores["heads.abs"], [h if j == i else 4 for j in range(4)])
        want = model_losses(loaded, [direct], data.validation, loss=search, batch_size=16)[0]
        assert curves.head_losses[i][h - 1] == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert all(curves.head_losses[i][0] > curves.base_loss for i in range(4))  # one head of four departs
    assert "heads" in curves.to_dict() and "heads" not in B.Curves([[1]], [[0.0]], 0.0).to_dict()


def test_a_latency_budget_with_heads_measures_both_axes_and_chooses_both(tmp_path):
    """The quickstart to a speedup with prune.heads: the table has a heads axis, the curves a row per
    head count, the checks and the build carry the chosen heads (cheap timing: not a speed test)."""
    import json

    from tests.conftest import QUICKSTART, build
    from tests.test_budget import CHEAP

    out = tmp_path / "o"
    res = build(QUICKSTART, "--out", out, *CHEAP, "prune.heads=true", "prune.target_speedup=1.05")
    assert res.exit_code == 0, res.output
    search = read_search(out)
    lb = search["latency_budget"]
    t = lb["table"]  # the heads axis is timed with every MLP one candidate below whole, and starts from that model
    assert t["heads"]["heads"] == [1, 2, 3, 4] and t["heads"]["mlp_width"] == t["widths"][-2]
    assert t["heads"]["fitted"][-1] == t["fitted"][-2] and max(t["heads"]["fitted"]) <= t["fitted"][-2]
    assert t["heads"]["block_saving"][-1] == 0.0
    assert lb["curves"]["heads"] == [[1, 2, 3, 4]] * 4 and len(lb["curves"]["head_losses"]) == 4
    assert all(h is not None for c in lb["checks"] for _, h in c["shapes"])  # every check chose a head count
    assert search["shapes"] in [c["shapes"] for c in lb["checks"]]
    assert search["original_heads"] == [4] * 4
    rep = json.loads((out / "report.json").read_text())
    assert rep["heads"]["pruned"] == search["heads"]
    back = load_pruned(out / "pruned.safetensors")
    from amp_deploy.prune.families import find_attn_sites, find_sites

    blocks = back.get_submodule(find_sites(back)[0])
    assert [b.get_submodule(s.proj).in_features // s.head_dim
            for b, s in zip(blocks, find_attn_sites(blocks))] == search["heads"]
    md = (out / "report.md").read_text()
    assert "Heads axis: every block at one head count" in md and "| heads |" in md
    assert (out / "plots" / "latency_budget.png").stat().st_size > 1000


def test_heads_with_an_unknown_attention_is_one_line(tmp_path):
    from tests.conftest import build, tiny_recipe

    recipe = tiny_recipe(tmp_path, prune={"heads": True, "threshold": 0.05, "steps": 2},
                         model={"source": "timm", "name": "beit_base_patch16_224",  # BEiT's relative-position attention
                                "kwargs": {"depth": 2, "img_size": 32, "embed_dim": 64, "num_heads": 2}})
    res = build(recipe, "--out", tmp_path / "b")
    assert res.exit_code == 2 and "prune.heads: the attention of" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b" / "scores.safetensors").exists()  # refused before scoring


def test_a_budget_the_smallest_heads_cannot_reach_is_one_line(tmp_path):
    from tests.conftest import build, tiny_recipe
    from tests.test_budget import _refused_after_scoring

    recipe = tiny_recipe(tmp_path, prune={"heads": True, "target_params": 0.02, "steps": 2})
    res = build(recipe, "--out", tmp_path / "c")
    _refused_after_scoring(res, "prune.target_params: 0.02")  # the scores are done and kept
    assert "and one attention head per block" in res.output
    assert not (tmp_path / "c" / "search.json").exists()


def test_a_threshold_search_with_heads_records_the_original_heads_not_the_cut_ones(tmp_path):
    """Without a budget the search prunes the model it is given in place: the original head counts are
    taken before it, and the checkpoint carries them for `inspect`."""
    import json

    from typer.testing import CliRunner

    from amp_deploy.checkpoint import read_metadata
    from amp_deploy.cli import app
    from amp_deploy.prune.families import load_model
    from tests.conftest import FAST, build, tiny_recipe

    recipe = tiny_recipe(tmp_path, prune={"threshold": 0.5, "steps": 3, "heads": True})
    out = tmp_path / "out"
    res = build(recipe, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    search = read_search(out)
    full = load_model("timm", "test_vit", False, {"depth": 2, "img_size": 32, "num_classes": 10}).heads()
    assert search["original_heads"] == full and search["heads"] != full  # heads were cut at this threshold
    meta = read_metadata(out / "pruned.safetensors")
    assert json.loads(meta["original_shapes"]) == search["original_shapes"] and json.loads(meta["shapes"]) == \
        search["shapes"] and [h for _, h in search["shapes"]] == search["heads"]
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and f"{search['heads'][0]} of {full[0]}" in shown.output, shown.output


def test_open_clip_attention_is_replaced_by_an_equivalent_module_and_old_checkpoints_load(tmp_path):
    """open_clip's nn.MultiheadAttention becomes PackedSelfAttention at load (its output projection a
    module, so heads are scored and cut): the same outputs as open_clip's own tower, and a state dict
    with MultiheadAttention's names (a checkpoint saved before) loads into it."""
    import open_clip

    from amp_deploy.prune.families import PackedSelfAttention, load_model

    source, name, kwargs = FAMILIES["open_clip_vit"]
    own = open_clip.create_model_and_transforms(name, **kwargs)[0].visual.eval()
    loaded = load_model(source, name, False, kwargs)
    assert all(isinstance(b.attn, PackedSelfAttention) for b in loaded.block_list())
    old = own.state_dict()
    assert any(k.endswith("attn.in_proj_weight") for k in old)
    loaded.model.load_state_dict(old)
    x = torch.randn(3, *loaded.input_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), own(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["vit", "eva02_clip", "open_clip_vit", "hf_Dinov2Model"])
def test_a_shared_copy_is_pruned_without_copying_or_changing_the_original(key):
    """The searches' throw-away copies (Loaded.shared_copy): new modules over the original's own weight
    tensors, so a parameter-budget search holds one model, not one per step; cutting widths and heads
    of the copy leaves the original's modules, weights and outputs as they were."""
    loaded = _load(key)
    x = _data(loaded).holdout.images
    with torch.no_grad():
        before = loaded.model(x)
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    widths, heads = loaded.widths(), loaded.heads()
    cut = loaded.shared_copy()
    shared = {p.data_ptr() for p in loaded.model.parameters()}
    assert {p.data_ptr() for p in cut.model.parameters()} == shared  # nothing copied
    apply_widths(cut, [torch.rand(w) for w in widths], [max(1, w // 2) for w in widths])
    apply_heads(cut, None, [1] * len(heads))
    assert cut.widths() != widths and cut.heads() == [1] * len(heads)
    assert loaded.widths() == widths and loaded.heads() == heads
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    with torch.no_grad():
        assert torch.equal(loaded.model(x), before)
        assert cut.model(x).shape == before.shape
