"""Reports users compare: the regression gate, the parity gate, and real plots."""

import json
import shutil

import onnx
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from amp_deploy.cli import app

runner = CliRunner()


def _slower_copy(src, dst, batch, factor):
    rep = json.loads((src / "report.json").read_text())
    row = rep["runtimes"]["onnxruntime"]["latency_ms"]["pruned"][batch]
    row["p50"] *= factor
    row["throughput"] /= factor
    if "samples" in row:
        row["samples"] = [v * factor for v in row["samples"]]
    dst.mkdir()
    (dst / "report.json").write_text(json.dumps(rep))
    return dst


def test_compare_gate_on_a_10_percent_slower_p50(quickstart, tmp_path):
    import numpy as np

    # 200 timed rounds with 5% noise (the fixture's build times only 5: too few to resolve 10% from 5%)
    rep = json.loads((quickstart[0] / "report.json").read_text())
    rng = np.random.default_rng(0)
    for model in ("original", "pruned"):
        for batch in ("1", "8"):
            row = rep["runtimes"]["onnxruntime"]["latency_ms"][model][batch]
            row["samples"] = list(row["p50"] * rng.lognormal(0.0, 0.05, 200))
    a = tmp_path / "a"
    a.mkdir()
    (a / "report.json").write_text(json.dumps(rep))
    b = _slower_copy(a, tmp_path / "b", "8", 1.10)
    res = runner.invoke(app, ["compare", str(a), str(b), "--fail-on-regression", "5"])
    assert res.exit_code == 1, res.output
    assert "onnxruntime pruned batch 8" in res.output and "+10.0%" in res.output
    res = runner.invoke(app, ["compare", str(a), str(b), "--fail-on-regression", "15"])
    assert res.exit_code == 0, res.output


def test_compare_formats(quickstart, tmp_path):
    a = quickstart[0]
    b = _slower_copy(a, tmp_path / "b", "1", 1.0)
    md = runner.invoke(app, ["compare", str(a / "report.json"), str(b), "--format", "md"])
    assert md.exit_code == 0 and md.output.startswith("| report | params |") and "| B | onnxruntime | pruned | 1 |" in md.output
    js = runner.invoke(app, ["compare", str(a), str(b), "--format", "json"])
    cmp = json.loads(js.output)
    assert {r["batch"] for r in cmp["rows"]} == {1, 8} and cmp["regressions"] == []


def test_compare_warns_when_settings_differ(quickstart, tmp_path):
    a = quickstart[0]
    rep = json.loads((a / "report.json").read_text())
    rep["environment"]["cpu_count"] = 64
    (tmp_path / "report.json").write_text(json.dumps(rep))
    res = runner.invoke(app, ["compare", str(a), str(tmp_path), "--format", "md"])
    assert "cpu_count differs" in res.output


def test_compare_rejects_what_is_not_a_report(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    res = runner.invoke(app, ["compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "not an amp-deploy report" in res.output


def test_parity_breach_exits_1_with_the_report_written(quickstart, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quickstart[0], out)
    model = onnx.load(str(out / "pruned.onnx"))
    init = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    arr = numpy_helper.to_array(init) * 1.05
    init.CopyFrom(numpy_helper.from_array(arr.astype(arr.dtype), init.name))
    onnx.save(model, str(out / "pruned.onnx"))
    (out / "report.json").unlink()
    res = runner.invoke(app, ["validate", str(out)])
    assert res.exit_code == 1, res.output
    assert "parity gate failed" in res.output and "onnxruntime pruned" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["gates"]["parity"]["passed"] is False
    assert any("onnxruntime pruned: max_abs_err" in b for b in rep["gates"]["parity"]["breaches"])
    assert rep["runtimes"]["onnxruntime"]["parity"]["original"]["max_abs_err"] <= 1e-4  # untouched file
    assert "FAILED" in (out / "report.md").read_text()


def test_plots_are_real_pngs_of_the_run(quickstart):
    out = quickstart[0]
    rep = json.loads((out / "report.json").read_text())
    assert rep["plots"] == ["plots/widths.png", "plots/latency.png", "plots/cosine.png"]
    md = (out / "report.md").read_text()
    for p in rep["plots"]:
        with Image.open(out / p) as im:
            assert im.format == "PNG" and im.size[0] > 300
        assert f"]({p})" in md
    assert len(rep["fidelity"]["cosines"]) == rep["fidelity"]["images"]


def test_fidelity_gate_is_optional_and_exits_1_when_breached(quickstart, tmp_path):
    from .conftest import FAST, QUICKSTART, build

    out = tmp_path / "out"
    shutil.copytree(quickstart[0], out)
    res = build(QUICKSTART, "--out", out, *FAST, "validate.fidelity.cosine_mean=0.9999999")
    assert res.exit_code == 1 and "fidelity gate failed" in res.output, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["gates"]["fidelity"]["passed"] is False and rep["gates"]["parity"]["passed"] is True
    assert "score: inputs unchanged" in res.output  # a gate is part of validation only
    res = build(QUICKSTART, "--out", out, *FAST, "validate.fidelity.accuracy_drop=1.0")
    assert res.exit_code == 0, res.output


def test_report_records_memory_and_timing_settings(quickstart):
    rep = json.loads((quickstart[0] / "report.json").read_text())
    ort = rep["runtimes"]["onnxruntime"]
    for k in ("original", "pruned"):
        mem = ort["memory"][k]
        assert mem["weights_bytes"] == (quickstart[0] / f"{k}.onnx").stat().st_size
        assert mem["host_peak_bytes"] is None or mem["host_peak_bytes"] >= 0
        st = ort["latency_ms"][k]["8"]
        assert st["min"] <= st["p50"] <= st["p90"] <= st["p99"] <= st["max"] and st["iterations"] == 5
        assert st["throughput"] > 0 and st["warmup_rounds"] >= 2
    assert rep["validate_settings"]["iterations"] == 5 and rep["environment"]["cpu"]
    assert ort["memory"]["pruned"]["weights_bytes"] < ort["memory"]["original"]["weights_bytes"]


def test_warmup_by_time():
    import time

    import numpy as np

    from amp_deploy.deploy.runtimes import Runner
    from amp_deploy.measure.metrics import latency

    calls = []
    runner = Runner(lambda x: calls.append(time.perf_counter()) or x)
    t0 = time.perf_counter()
    stats = latency({"a": runner}, np.zeros((1, 1), np.float32), warmup=1, iterations=3, warmup_seconds=0.05)
    assert time.perf_counter() - t0 >= 0.05 and stats["a"]["warmup_rounds"] > 1 and stats["a"]["iterations"] == 3


def test_the_regression_test_knows_noise_from_a_slowdown():
    """Synthetic timings (lognormal, spread 8%, 200 rounds): the same build twice passes a 5% gate in 20
    of 20 trials, a build 10% slower fails it in 20 of 20 (seeds fixed). With 50 rounds at that spread
    a 10% slowdown is not always resolved from a 5% gate: `compare` then warns (next test)."""
    import numpy as np

    from amp_deploy.measure.compare import change_test

    rng = np.random.default_rng(0)

    def timings(scale):
        return list(2.0 * scale * rng.lognormal(0.0, 0.08, 200))

    same = [change_test(timings(1.0), timings(1.0), 5.0) for _ in range(20)]
    slower = [change_test(timings(1.0), timings(1.10), 5.0) for _ in range(20)]
    assert not any(t["regression"] for t in same)
    assert all(t["regression"] for t in slower)
    assert sum(t["ci95_pct"][0] <= 10 <= t["ci95_pct"][1] for t in slower) >= 17  # the interval holds the change


def test_compare_cannot_judge_when_the_interval_holds_the_gate(quickstart, tmp_path):
    """Few, very noisy rounds: the change's interval holds the 5% gate, so neither a pass nor a
    regression: exit 3, with the rounds that would resolve it (issue 38, finding 2)."""
    import numpy as np

    a = quickstart[0]
    rep = json.loads((a / "report.json").read_text())
    rng = np.random.default_rng(1)
    for which in ("a", "b"):
        for model in ("original", "pruned"):
            for batch in ("1", "8"):
                rep["runtimes"]["onnxruntime"]["latency_ms"][model][batch]["samples"] = \
                    list(2.0 * rng.lognormal(0.0, 0.5, 20))  # few, very noisy rounds
        (tmp_path / which).mkdir()
        (tmp_path / which / "report.json").write_text(json.dumps(rep))
    res = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--fail-on-regression", "5",
                              "--format", "md"])
    assert res.exit_code == 3 and "neither rule a slowdown over 5% out" in res.output, res.output
    assert "timed rounds per report (validate.iterations) would resolve it" in res.output


def test_compare_without_samples_falls_back_to_the_p50s_with_a_warning(quickstart, tmp_path):
    a = quickstart[0]
    rep = json.loads((a / "report.json").read_text())
    for row in rep["runtimes"].values():
        for per in (row.get("latency_ms") or {}).values():
            for st in per.values():
                st.pop("samples", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "report.json").write_text(json.dumps(rep))
    b = _slower_copy(tmp_path / "a", tmp_path / "b", "8", 1.10)
    res = runner.invoke(app, ["compare", str(tmp_path / "a"), str(b), "--fail-on-regression", "5"])
    assert res.exit_code == 1 and "p50s only" in res.output and "keep no timing samples" in res.output
