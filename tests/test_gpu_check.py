"""benchmarks/gpu_check.py: its CPU-runnable parts, on tiny models (the GPU run itself needs a GPU)."""

import json
import subprocess
import sys

from .conftest import REPO


def test_gpu_check_cpu_smoke_runs_every_section_it_can(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["smoke"] and result["device"] == "CPU (smoke)" and result["seconds"] < 60
    s = result["sections"]
    assert s["pytest"]["status"] == s["quickstart"]["status"] == "not run"
    for name in ("scale", "bf16", "latency"):
        assert s[name]["status"] == "ok", s[name]
    scale = s["scale"]
    assert scale["search_same_widths"] and scale["search_cached"]["block_forwards"] < scale["search_naive"]["block_forwards"]
    assert scale["largest_calibration_batch"]["largest_fitting"] == 16  # the smoke's own cap
    assert -1 <= s["bf16"]["spearman_min"] <= 1
    for model in ("large", "giant"):
        rows = s["latency"][model]["rows"]
        assert {r["batch"] for r in rows} == {1, 2} and all(r["flop_speedup"] > 1 for r in rows)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "not GPU figures" in md and "realised/FLOP" in md
