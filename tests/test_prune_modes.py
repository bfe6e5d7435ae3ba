"""Criteria, search modes, alignment and budgets on the embedded digits model; scoring across
processes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from amp_deploy.pipeline.context import Context
from amp_deploy.pipeline.run import run_stages
from amp_deploy.pipeline.stages import PRUNE_STAGES
from amp_deploy.recipe import load_recipe

from .conftest import QUICKSTART, build, read_search, tiny_recipe


def _prune(tmp_path, *overrides):
    recipe = load_recipe(QUICKSTART, list(overrides))
    out = tmp_path / "out"
    run_stages(Context.create(recipe, out, "cpu"), PRUNE_STAGES)
    return read_search(out), out


def _params(out):
    from amp_deploy import load_pruned
    from amp_deploy.prune.families import count_params

    return count_params(load_pruned(out / "pruned.safetensors"))


def test_align_64_gives_multiples_of_64(tmp_path):
    search, _ = _prune(tmp_path, "prune.align=64", "prune.threshold=0.02")
    assert all(w % 64 == 0 and 0 < w <= 256 for w in search["widths"])
    assert search["widths"] != search["original_widths"]


def test_parameter_budget_is_met_as_closely_as_the_steps_allow(tmp_path):
    search, out = _prune(tmp_path, "prune.target_params=0.6")
    total = 202_570
    assert _params(out) <= search["budget_params"] == int(0.6 * total)
    assert _params(out) >= 0.57 * total  # one width step per block is ~0.4% of the model
    assert search["threshold"] > 0 and len(search["thresholds_tried"]) > 3
    assert search["block_forwards_all_thresholds"] == sum(t[2] for t in search["thresholds_tried"]) > search["block_forwards"]
    check = search["uniform_check"]  # the threshold search's widths against uniform widths of the same budget
    assert len(set(check["widths"])) == 1 and check["params"] <= search["budget_params"] < check["params"] + 4 * 130
    assert check["adaptive_params"] <= search["budget_params"] and check["loss"] > 0 and check["adaptive_loss"] > 0
    kept = "uniform" if check["loss"] < check["adaptive_loss"] else "adaptive"
    assert check["chosen"] == kept and search["widths"] == check[{"uniform": "widths", "adaptive": "adaptive_widths"}[kept]]


def test_the_uniform_check_scores_both_models_with_the_search_loss(tmp_path):
    """model_losses = the divergence of each whole model from the original, computed directly."""
    import copy

    from amp_deploy.prune.families import count_params
    from amp_deploy.prune.rebuild import apply_widths
    from amp_deploy.prune.score import Divergence
    from amp_deploy.prune.search import model_losses, uniform_for_params

    ctx = Context.create(load_recipe(QUICKSTART), tmp_path / "o", "cpu")
    original, val = ctx.original(), ctx.data().validation
    scores = [torch.rand(256, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    budget = int(0.6 * count_params(original.model))
    uniform, widths = uniform_for_params(lambda: copy.deepcopy(original), scores, budget, 1)
    assert len(set(widths)) == 1 and count_params(uniform.model) <= budget
    wider = copy.deepcopy(original)
    apply_widths(wider, scores, [w + 1 for w in widths])
    assert count_params(wider.model) > budget  # the largest that fits
    loss = Divergence("predictions", 1.0)
    got = model_losses(original, [uniform, original], val, loss=loss, batch_size=64)
    with torch.no_grad():
        x = val.images
        want = loss(uniform.model(x), None, original.model(x)).mean().item()
    assert got[0] == pytest.approx(want, rel=1e-5) and got[1] == pytest.approx(0.0, abs=1e-7)


def test_uniform_keeps_the_same_fraction_everywhere(tmp_path):
    search, _ = _prune(tmp_path, "prune.search=uniform", "prune.keep_ratio=0.5")
    assert search["widths"] == [128, 128, 128, 128] and search["block_forwards"] == 0


@pytest.mark.parametrize("criterion", ["ce", "magnitude", "random"])
def test_other_criteria_score_differently(tmp_path, criterion):
    _, out = _prune(tmp_path, f"prune.criterion={criterion}")
    ref, _ = _prune(tmp_path / "ref")
    scores = load_file(str(out / "scores.safetensors"))
    entropy = load_file(str(tmp_path / "ref" / "out" / "scores.safetensors"))
    assert scores["abs.0"].shape == (256,) and not torch.allclose(scores["abs.0"], entropy["abs.0"])


def test_signed_taylor_ranks_differently(tmp_path):
    a, _ = _prune(tmp_path / "a", "prune.taylor=signed")
    b, _ = _prune(tmp_path / "b")
    assert a["widths"] != b["widths"] or a["losses"] != b["losses"]


def test_naive_search_gives_the_same_widths_with_more_block_forwards(tmp_path):
    cached, _ = _prune(tmp_path / "c")
    naive, _ = _prune(tmp_path / "n", "prune.cache=false")
    assert cached["widths"] == naive["widths"]
    assert cached["block_forwards_naive"] == naive["block_forwards"] > cached["block_forwards"]


def test_two_gloo_processes_give_the_scores_of_one(tmp_path):
    recipe = tiny_recipe(tmp_path, data={"source": "synthetic", "calibration": 32, "validation": 16, "holdout": 8,
                                         "batch_size": 8})
    one, two = tmp_path / "one", tmp_path / "two"
    assert build(recipe, "--out", one).exit_code == 0
    res = build(recipe, "--out", two, "--nproc", "2")
    assert res.exit_code == 0, res.output
    a, b = load_file(str(one / "scores.safetensors")), load_file(str(two / "scores.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        rel = ((a[k] - b[k]).abs() / a[k].abs().clamp_min(1e-12)).max().item()
        assert rel <= 1e-5, (k, rel)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert ra["widths"] == rb["widths"]


def test_a_search_in_two_gloo_processes_settles_the_widths_and_heads_of_one(tmp_path):
    """The parameter budget's threshold search (with heads and its uniform check) on 2 processes: each
    evaluates half the validation batches, the losses are all-reduced; the same widths, heads and
    losses (within float noise) as one process."""
    recipe = tiny_recipe(tmp_path, data={"source": "synthetic", "calibration": 16, "validation": 32, "holdout": 8,
                                         "batch_size": 8},
                         prune={"target_params": 0.7, "steps": 3, "heads": True, "search_loss": "divergence"})
    one, two = tmp_path / "one", tmp_path / "two"
    assert build(recipe, "--out", one).exit_code == 0
    res = build(recipe, "--out", two, "--nproc", "2")
    assert res.exit_code == 0, res.output
    a, b = (read_search(d) for d in (one, two))
    assert a["widths"] == b["widths"] and a["heads"] == b["heads"] and a["threshold"] == b["threshold"]
    assert [t[:2] for t in a["thresholds_tried"]] == [t[:2] for t in b["thresholds_tried"]]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6, abs=1e-9)
    assert a["uniform_check"]["loss"] == pytest.approx(b["uniform_check"]["loss"], rel=1e-6, abs=1e-9)


def test_a_latency_budget_search_in_two_gloo_processes_splits_its_loss_curves_and_times_on_one(tmp_path):
    """A latency budget under --nproc 2: the loss curves are split over the ranks and all-reduced (the
    same as one process's, within float noise); the table and the checks are timed by rank 0 alone and
    sent to the other rank (both settle one choice: search.json is written once, by rank 0)."""
    recipe = load_recipe(QUICKSTART, ["prune.target_speedup=1.05", "prune.latency.widths=3",
                                      "prune.latency.iterations=5", "prune.latency.warmup=1",
                                      "prune.latency.corrections=1", "data.calibration=64", "data.validation=64"])
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, 1), (two, 2)):  # score and search only: the later stages are not what is tested
        run_stages(Context.create(recipe, out, "cpu", nproc=nproc), ("score", "search"))
    a, b = (json.loads((d / "search.json").read_text())["latency_budget"] for d in (one, two))
    ca, cb = a["curves"], b["curves"]
    assert ca["base_loss"] == pytest.approx(cb["base_loss"], rel=1e-6, abs=1e-9)
    assert sum(ca["losses"], []) == pytest.approx(sum(cb["losses"], []), rel=1e-5, abs=1e-6)
    assert b["table"]["rounds"] == a["table"]["rounds"] and len(b["checks"]) >= 1
    assert b["seconds"]["table"] > 0


def test_a_pruned_checkpoint_can_be_pruned_again(quickstart, tmp_path):
    import yaml

    first = json.loads((quickstart[0] / "report.json").read_text())["widths"]["pruned"]
    recipe = tmp_path / "again.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "again", "model": {"source": "checkpoint", "pretrained": str(quickstart[0] / "pruned.safetensors")},
        "data": {"source": "digits", "calibration": 128, "validation": 128, "holdout": 64},
        "prune": {"threshold": 0.02}}))
    out = tmp_path / "out"
    run_stages(Context.create(load_recipe(recipe), out, "cpu"), PRUNE_STAGES)
    search = read_search(out)
    assert search["original_widths"] == first
    assert all(w <= h for w, h in zip(search["widths"], first)) and search["widths"] != first
