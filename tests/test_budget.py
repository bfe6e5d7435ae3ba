"""Pruning to a latency budget (issue 20, items 1-2): the knapsack, the latency table, the loss
curves, the refusals, and a quickstart build with prune.target_speedup."""

import copy
import itertools
import json
import random

import numpy as np
import pytest
import torch

from amp_deploy.data import Split
from amp_deploy.errors import UserError
from amp_deploy.prune import budget as B
from amp_deploy.prune.families import Loaded, find_sites
from amp_deploy.prune.rebuild import keep_top, prune_block
from amp_deploy.prune.score import Divergence
from amp_deploy.prune.search import _Evaluator
from amp_deploy.recipe import load_recipe

from .conftest import QUICKSTART, assert_one_line_error, build, read_search
from .test_score_search import EmbedNet

# Cheap settings for a latency-budget build of the quickstart model (timing is not what is tested).
CHEAP = ["export.exporter=torchscript", "prune.latency.widths=4", "prune.latency.iterations=30",
         "prune.latency.warmup=5", "prune.latency.corrections=1", "validate.iterations=8", "validate.warmup=2",
         "runtimes=[onnxruntime]"]


def _knapsack_matches(table, curves, speedup, feasible):
    """The knapsack's choice against the brute force's feasible losses (None where none is feasible,
    and the knapsack said so)."""
    if not feasible:
        with pytest.raises(ValueError, match="out of reach"):
            B.choose_widths(table, curves, speedup)
        return None
    choice = B.choose_widths(table, curves, speedup)
    assert choice.loss_increase == pytest.approx(min(feasible), abs=1e-12)
    assert choice.predicted_speedup >= speedup * (1 - 1e-3)  # savings were rounded down, never up
    return choice


def test_the_knapsack_finds_the_least_loss_that_meets_the_budget_by_brute_force():
    rng = random.Random(0)
    widths = B.candidate_widths(64, 5, 8)
    for _ in range(150):
        depth = rng.randint(1, 4)
        ratio = sorted(rng.random() for _ in widths[:-1]) + [1.0]
        table = B.latency_table(widths, depth, {w: [r * 10.0] * 3 for w, r in zip(widths, ratio)},
                                {w: [10.0] * 3 for w in widths[:-1]})
        curves = B.Curves([widths] * depth, [[rng.random() for _ in widths[:-1]] + [0.0] for _ in range(depth)], 0.0)
        speedup = rng.uniform(1.01, B.max_speedup(table, curves) * 1.1)
        need = int(np.ceil((1 - 1 / speedup) * B.UNITS - 1e-9))
        feasible = [sum(curves.losses[i][k] for i, k in enumerate(combo))
                    for combo in itertools.product(range(len(widths)), repeat=depth)
                    if sum(int(np.floor(table.saving(widths[k]) * B.UNITS + 1e-9)) for k in combo) >= need]
        choice = _knapsack_matches(table, curves, speedup, feasible)
        if choice is None:
            continue
        assert sum(b["loss_increase"] for b in choice.per_block) == pytest.approx(choice.loss_increase)


def test_with_heads_the_knapsack_chooses_a_width_and_a_head_count_per_block_by_brute_force():
    rng = random.Random(1)
    widths, heads = B.candidate_widths(64, 4, 8), B.candidate_heads(4, 12)
    assert heads == [1, 2, 3, 4] and B.candidate_heads(16, 4) == [4, 8, 12, 16]
    for _ in range(80):
        depth = rng.randint(1, 3)
        wr = sorted(rng.uniform(0.5, 1) for _ in widths[:-1]) + [1.0]
        hr = sorted(rng.uniform(0.6, 1) for _ in heads[:-1]) + [1.0]
        table = B.latency_table(widths, depth, {w: [r * 10.0] * 3 for w, r in zip(widths, wr)},
                                {w: [10.0] * 3 for w in widths[:-1]}, heads=heads,
                                head_samples={h: [r * 10.0] * 3 for h, r in zip(heads, hr)},
                                head_full_samples={h: [10.0] * 3 for h in heads[:-1]})
        curves = B.Curves([widths] * depth, [[rng.random() for _ in widths[:-1]] + [0.0] for _ in range(depth)], 0.0,
                          heads=[heads] * depth,
                          head_losses=[[rng.random() for _ in heads[:-1]] + [0.0] for _ in range(depth)])
        speedup = rng.uniform(1.01, B.max_speedup(table, curves) * 1.05)
        need = int(np.ceil((1 - 1 / speedup) * B.UNITS - 1e-9))

        def units(w, h, t=table):
            return int(np.floor(t.saving(w) * B.UNITS + 1e-9)) + int(np.floor(t.head_saving(h) * B.UNITS + 1e-9))

        pairs = list(itertools.product(range(len(widths)), range(len(heads))))
        feasible = [sum(curves.losses[i][a] + curves.head_losses[i][b] for i, (a, b) in enumerate(combo))
                    for combo in itertools.product(pairs, repeat=depth)
                    if sum(units(widths[a], heads[b]) for a, b in combo) >= need]
        choice = _knapsack_matches(table, curves, speedup, feasible)
        if choice is None:
            continue
        assert len(choice.heads) == depth and all(h in heads for h in choice.heads)
        got = sum(curves.losses[i][widths.index(w)] + curves.head_losses[i][heads.index(h)]
                  for i, (w, h) in enumerate(zip(choice.widths, choice.heads)))
        assert got == pytest.approx(choice.loss_increase)
        saving = sum(table.saving(w) + table.head_saving(h) for w, h in zip(choice.widths, choice.heads))
        assert choice.predicted_ratio == pytest.approx(1 - saving)
    # the heads axis raises the reach: every block also at one head
    no_heads = B.Curves(curves.widths, curves.losses, 0.0)
    assert B.max_speedup(table, curves) > B.max_speedup(table, no_heads)
    assert B.choose_widths(table, no_heads, 1.01).heads is None


def test_candidate_widths_and_the_table_fit():
    assert B.candidate_widths(1536, 12, 1) == list(range(128, 1537, 128))
    assert B.candidate_widths(192, 12, 64) == [64, 128, 192]  # the align grid, no repeats
    assert B.candidate_widths(100, 3, 1) == [33, 67, 100]
    assert B.monotone([1, 3, 2, 4, 0.5, 6]) == [1, 2.375, 2.375, 2.375, 2.375, 6]
    # a candidate measured slower than the full model (noise) saves nothing; the full width saves exactly 0
    t = B.latency_table([10, 20, 30], 2, {10: [5.0, 5.2], 20: [10.4, 10.6]}, {10: [10.0, 10.0], 20: [10.0, 10.0]})
    assert t.fitted == [pytest.approx(0.51), 1.0, 1.0] and t.saving(30) == 0 and t.saving(20) == 0
    assert t.saving(10) == pytest.approx((1 - 0.51) / 2)
    assert t.saving(15) == pytest.approx((1 - (0.51 + 1.0) / 2) / 2)  # linear between candidates


def test_loss_curves_equal_a_direct_evaluation_of_each_block_pruned_alone():
    torch.manual_seed(0)
    net = EmbedNet(d=16, h=32, depth=3)
    loaded = Loaded(net.eval(), *find_sites(net), "embedding", transform=None, input_size=(5, 16, 1))
    val = Split(torch.randn(24, 5, 16), None)
    scores = [torch.rand(32) for _ in range(3)]
    cands = [B.candidate_widths(32, 4, 1)] * 3
    loss = Divergence("image-image", 20.0)
    curves = B.loss_curves(loaded, scores, val, cands, loss=loss, batch_size=8)
    assert loaded.widths() == [32, 32, 32]  # left unpruned
    assert curves.base_loss == 0.0 and all(row[-1] == 0.0 for row in curves.losses)
    for i, w in [(0, 8), (1, 16), (2, 24)]:
        direct = copy.deepcopy(loaded)
        prune_block(direct, i, keep_top(scores[i], w))
        ev = _Evaluator(direct, val, 8, loss, torch.device("cpu"), cached=False)
        ev.refs = [net(x).float() for x, _ in val.batches(8)]  # the unpruned model's outputs
        assert curves.losses[i][cands[i].index(w)] == pytest.approx(ev(0), rel=1e-5, abs=1e-9)
    assert all(curves.losses[i][0] > 0 for i in range(3))


@pytest.mark.parametrize("override, needle", [
    (["prune.target_speedup=1.5", "prune.latency.runtime=onnxruntime-gpu"], "prune.latency.runtime"),
    (["prune.target_speedup=1.5", "prune.latency.batch=64"], "prune.latency.batch: 64 is outside export.batch"),
    (["prune.target_speedup=1.5", "prune.latency.precision=fp16"], "onnxruntime runs fp32 | int8, not fp16"),
    (["prune.target_speedup=1.5", "prune.latency.precision=int8"], "add onnxruntime-int8 to quantize.formats"),
    (["prune.target_speedup=1.5", "prune.target_params=0.5"], "give one budget"),
    (["prune.target_speedup=1.0"], "prune.target_speedup"),
    (["prune.target_speedup=1.5", "prune.latency.runtime=torch"], "torch is not in runtimes"),
    (["prune.target_speedup=1.5", "prune.search=uniform", "prune.keep_ratio=0.5"], "works with prune.search"),
])
def test_bad_budget_settings_are_refused_with_one_line(tmp_path, override, needle):
    res = build(QUICKSTART, "--out", tmp_path / "o", *override)
    assert_one_line_error(res, needle)
    assert not (tmp_path / "o").exists()


def test_a_budget_on_a_runtime_that_cannot_run_here_is_refused_before_any_work(tmp_path):
    from amp_deploy.deploy.runtimes import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT runs here")
    res = build(QUICKSTART, "--out", tmp_path / "o", "prune.target_speedup=1.5", "prune.latency.runtime=tensorrt",
                "prune.latency.precision=fp16")
    assert_one_line_error(res, "prune.latency.runtime tensorrt: cannot be measured here")
    assert not (tmp_path / "o").exists()


def test_a_recipe_names_the_budget_keys():
    r = load_recipe(QUICKSTART, ["prune.target_speedup=1.4", "prune.latency.batch=8"])
    assert r.prune.target_speedup == 1.4 and r.prune.latency.runtime == "onnxruntime"
    with pytest.raises(UserError, match="prune.latency.widths"):
        load_recipe(QUICKSTART, ["prune.target_speedup=1.4", "prune.latency.widths=1"])


def _refused_after_scoring(res, needle):
    """Exit 2 with one error line (the stages before the search, done and kept, say so first)."""
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in res.output, res.output


def test_a_quickstart_build_to_a_target_speedup_reports_predicted_and_measured(tmp_path):
    out = tmp_path / "o"
    # beyond reach: refused with what is reachable, once the table is measured; no search result written
    res = build(QUICKSTART, "--out", out, *CHEAP, "prune.target_speedup=20")
    _refused_after_scoring(res, "out of reach on onnxruntime fp32 at batch 8")
    assert "the measured table predicts" in res.output and not (out / "search.json").exists()
    res = build(QUICKSTART, "--out", out, *CHEAP, "prune.target_latency_ms=100000")
    _refused_after_scoring(res, "is met by the full model")

    res = build(QUICKSTART, "--out", out, *CHEAP, "prune.target_speedup=1.05")
    assert res.exit_code == 0, res.output
    search = read_search(out)
    lb = search["latency_budget"]
    table = lb["table"]
    assert table["widths"] == [64, 128, 192, 256] and table["fitted"][-1] == 1.0
    assert lb["curves"]["widths"] == [[64, 128, 192, 256]] * 4
    first = lb["checks"][0]
    assert first["aim"] == 1.05 and first["predicted_speedup"] >= 1.05 * 0.999
    assert len(lb["checks"]) <= 2 and search["shapes"] in [c["shapes"] for c in lb["checks"]]
    assert all(w in table["widths"] for w in search["widths"]) and search["widths"] != [256] * 4
    report = json.loads((out / "report.json").read_text())
    v = report["latency_budget"]["validate"]
    assert v["status"] == "ok" and v["row"] == "onnxruntime" and v["measured_speedup"] > 0
    assert report["prune"]["target_speedup"] == 1.05
    md = (out / "report.md").read_text()
    assert "## Latency budget" in md and "measured by validate" in md
    assert (out / "plots" / "latency_budget.png").stat().st_size > 1000
    # the search belongs to this machine: its key changes with the machine, a threshold search's does not
    from amp_deploy.pipeline import manifest
    from amp_deploy.pipeline.stages import STAGES

    recipe = load_recipe(QUICKSTART, ["prune.target_speedup=1.05"])
    plain = load_recipe(QUICKSTART, [])
    here = manifest.stage_keys(recipe, STAGES)["search"], manifest.stage_keys(plain, STAGES)["search"]
    real = manifest.machine
    try:
        manifest.machine = lambda: {**real(), "host": "elsewhere"}
        there = manifest.stage_keys(recipe, STAGES)["search"], manifest.stage_keys(plain, STAGES)["search"]
    finally:
        manifest.machine = real
    assert here[0] != there[0] and here[1] == there[1]


def test_the_correction_scales_by_the_miss_then_interpolates_between_checks_on_both_sides():
    assert B.corrected_aim([(1.3, 1.5)], 1.3) == pytest.approx(1.3 * 1.3 / 1.5)
    assert B.corrected_aim([(1.3, 1.5), (1.127, 1.2)], 1.3) == pytest.approx(1.127 + (1.3 - 1.127) * 0.1 / 0.3)
    assert B.corrected_aim([(1.2, 1.1), (1.4, 1.2)], 1.3) == pytest.approx(1.4 * 1.3 / 1.2)  # both below


def test_a_budget_on_eager_torch_needs_no_export_and_is_reported_on_the_torch_row(tmp_path):
    out = tmp_path / "o"
    res = build(QUICKSTART, "--out", out, *CHEAP, "runtimes=[onnxruntime,torch]", "prune.latency.runtime=torch",
                "prune.target_speedup=1.02", "prune.latency.corrections=0")
    assert res.exit_code == 0, res.output
    lb = json.loads((out / "report.json").read_text())["latency_budget"]
    assert lb["runtime"] == "torch" and len(lb["checks"]) == 1
    assert lb["validate"]["row"] == "torch" and lb["validate"]["status"] == "ok"
    assert "latency budget: 1.020x asked on torch fp32 at batch 8" in res.output


@pytest.mark.parametrize("stay_open", [False, True])
def test_the_table_prepares_every_candidate_once_and_opens_one_at_a_time(tmp_path, stay_open):
    """Twelve candidates of a giant model must not sit in memory together: when memory is short,
    besides the full model's runner one candidate's runner is open at a time; when it is not, each
    runner is opened once and kept between passes (a fresh session's first calls are slower). Either
    way each candidate is prepared (exported) only once."""
    import weakref

    from amp_deploy.deploy import runtimes as R
    from amp_deploy.pipeline.context import Context
    from amp_deploy.pipeline.speedup import TABLE_PASSES, _table

    r = load_recipe(QUICKSTART, ["prune.target_speedup=1.2", "prune.latency.iterations=6", "prune.latency.warmup=1"])
    ctx = Context.create(r, tmp_path / "o")
    prepared, opened, live, most = [], [], [0], [0]

    def closed() -> None:
        live[0] -= 1

    def make(build, tag):
        prepared.append(tag)

        def open_runner():
            run = R.Runner(lambda x: x, {"tag": tag})
            live[0] += 1
            most[0] = max(most[0], live[0])
            weakref.finalize(run, closed)
            opened.append(tag)
            return run

        return open_runner

    cands = [[16, 32, 48, 64]] * 4
    table, full = _table(ctx, make, None, cands, np.zeros((8, 1), np.float32), stay_open)
    assert prepared == ["w16", "w32", "w48", "w64"] and full.info["tag"] == "w64"
    assert sorted(opened) == sorted(["w64"] + ["w16", "w32", "w48"] * (1 if stay_open else TABLE_PASSES))
    assert most[0] == (4 if stay_open else 2)  # all, or the full model and one candidate
    assert live[0] == 1 and table.widths == [16, 32, 48, 64]  # afterwards the full model only


def test_runners_stay_open_only_while_memory_allows():
    from amp_deploy.pipeline.speedup import KEEP_OPEN_SHARE, available_bytes, keep_open

    free = available_bytes(torch.device("cpu"))
    assert free and free > 0
    assert keep_open(1, 12, torch.device("cpu"))
    assert not keep_open(16 * int(free * KEEP_OPEN_SHARE / 12), 12, torch.device("cpu"))


def test_the_tensorrt_latency_path_builds_engines_as_the_compile_stage_does(monkeypatch, tmp_path):
    """Not run here (no TensorRT): the wiring is checked with the engine build and runner replaced."""
    import onnx

    from amp_deploy.deploy import runtimes as R
    from amp_deploy.deploy import tensorrt_engine
    from amp_deploy.pipeline.context import Context
    from amp_deploy.pipeline.speedup import runner_factory

    built = []
    monkeypatch.setattr(tensorrt_engine, "build_engine",
                        lambda onnx_path, plan, settings, cache=None: built.append((onnx_path, plan, settings)))
    monkeypatch.setattr(R, "tensorrt_runner", lambda plan: R.Runner(lambda x: x, {"plan": str(plan)}))
    r = load_recipe(QUICKSTART, ["prune.target_speedup=1.2", "prune.latency.runtime=tensorrt",
                                 "prune.latency.precision=fp16", "export.exporter=torchscript"])
    ctx = Context.create(r, tmp_path / "o")
    loaded = ctx.original()
    opener = runner_factory(ctx, loaded.input_size, tmp_path)(lambda: loaded.model, "w64")
    assert len(built) == 1  # the engine is built once, when prepared; each opening only loads it
    runner = opener()
    (onnx_path, plan, settings), = built
    assert runner.info["plan"] == str(plan) == str(tmp_path / "w64.plan")
    assert settings.precision == "fp16" and settings.strongly_typed and settings.batch_opt == 8
    graph = onnx.load(str(onnx_path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the graph carries the precision


def test_a_budget_over_the_fp32_original_checks_against_it_and_scales_the_table(monkeypatch, tmp_path):
    """prune.latency.baseline fp32: the table is in the budget's precision (here a simulated int8 that
    runs the full model 2x faster than fp32, and whose latency falls with the MLP widths as the table
    says), the target is over the fp32 original. The knapsack is asked for target / 2, every check is
    timed against the fp32 runner, and the records are over fp32."""
    from amp_deploy.deploy import runtimes as R
    from amp_deploy.pipeline import speedup as S
    from amp_deploy.pipeline.context import Context

    widths = [16, 32, 48, 64]
    depth = 4
    ratio = {16: 0.4, 32: 0.6, 48: 0.8, 64: 1.0}  # int8 latency of every block at w, over the full int8 model
    table = B.latency_table(widths, depth, {w: [ratio[w] * 10.0] * 3 for w in widths[:-1]},
                            {w: [10.0] * 3 for w in widths[:-1]})
    curves = B.Curves([widths] * depth, [[0.3, 0.2, 0.1, 0.0] for _ in range(depth)], 0.0)

    def int8_ms(ws):  # what the simulated int8 runtime takes for a model of these widths
        return 10.0 * (1 - sum(1 - ratio[w] for w in ws) / depth)

    fp32 = R.Runner(lambda x: x, {"ms": 20.0})  # the fp32 original: twice the int8 original
    asked = []

    def make(build, tag):
        return lambda: R.Runner(lambda x: x, {"ms": int8_ms(asked[-1].widths)})

    real_choose = B.choose_widths
    monkeypatch.setattr(B, "choose_widths", lambda t, c, aim: asked.append(real_choose(t, c, aim)) or asked[-1])
    monkeypatch.setattr(S, "_pruned", lambda *a, **k: None)
    monkeypatch.setattr(S.M, "latency", lambda runners, x, warmup, n: {
        k: {"samples": [r.info["ms"]] * n, "p50": r.info["ms"]} for k, r in runners.items()})
    r = load_recipe(QUICKSTART, ["prune.target_speedup=3.0", "prune.latency.baseline=fp32",
                                 "prune.latency.precision=int8", "quantize.formats=[onnxruntime-int8]"])
    ctx = Context.create(r, tmp_path / "o")
    rounds = S._checks(ctx, make, fp32, None, table, curves, 3.0, B.max_speedup(table, curves) * 2.0, None, scale=2.0)
    first = rounds[0]
    assert first["aim"] == 3.0 and first["full_ms"] == 20.0  # timed against the fp32 runner
    assert asked[0].predicted_speedup >= 1.5 * 0.999  # the knapsack was asked for 3.0 / 2
    assert first["predicted_speedup"] == pytest.approx(asked[0].predicted_speedup * 2.0)
    assert first["measured_speedup"] == pytest.approx(20.0 / int8_ms([w for w, _ in first["shapes"]]))
    assert abs(rounds[-1]["measured_speedup"] / 3.0 - 1) <= r.prune.latency.tolerance


def test_a_budget_over_the_fp32_original_out_of_reach_says_so(tmp_path):
    out = tmp_path / "o"
    res = build(QUICKSTART, "--out", out, *CHEAP, "quantize.formats=[onnxruntime-int8]", "prune.latency.precision=int8",
                "prune.latency.baseline=fp32", "prune.target_speedup=40")
    _refused_after_scoring(res, "speedup over the original in fp32 on onnxruntime is out of reach on onnxruntime int8")
    assert not (out / "search.json").exists()
