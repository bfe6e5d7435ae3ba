"""benchmarks/gpu_check.py: its CPU-runnable parts, on tiny models (the GPU run itself needs a GPU)."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `--cpu-smoke` run: (its --out folder, the completed process)."""
    out = tmp_path_factory.mktemp("smoke")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res


def test_gpu_check_cpu_smoke_runs_every_section_it_can(smoke):
    tmp_path, _ = smoke
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["smoke"] and result["device"] == "CPU (smoke)" and result["seconds"] < 60
    s = result["sections"]
    assert s["pytest"]["status"] == s["quickstart"]["status"] == "not run"
    for name in ("scale", "bf16", "latency", "sharded"):
        assert s[name]["status"] == "ok", s[name]
    runs = s["sharded"]["runs"]  # FSDP2 through torchrun: 1 and 2 gloo processes, fp32 alike within float noise
    assert [(r["processes"], r["precision"]) for r in runs] == [(1, "fp32"), (2, "fp32"), (2, "bf16")]
    assert runs[1]["max_abs_diff_to_1_process"] < 1e-4 and len(runs[1]["peak_bytes_per_rank"]) == 2
    scale = s["scale"]
    assert scale["search_same_widths"] and scale["search_cached"]["block_forwards"] < scale["search_naive"]["block_forwards"]
    assert scale["largest_calibration_batch"]["largest_fitting"] == 16  # the smoke's own cap
    assert -1 <= s["bf16"]["spearman_min"] <= 1
    for model in ("large", "giant"):
        rows = s["latency"][model]["rows"]
        assert {r["batch"] for r in rows} == {1, 2} and all(r["flop_speedup"] > 1 for r in rows)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "not GPU figures" in md and "realised/FLOP" in md and "Sharded distillation (FSDP2" in md


def test_the_smoke_saves_under_out_and_prints_the_table(smoke):
    """What the device tool brings back: a few files under --out, the table on stdout."""
    tmp_path, res = smoke
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["gpu_check.json", "gpu_check.md"], files
    assert "| section | status | seconds | note |" in res.stdout and "| scale | ok |" in res.stdout


def test_a_section_that_does_not_fit_the_time_left_is_not_run(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    saves = []
    check = gpu_check.Check(10.0, lambda: saves.append(1))
    check.run("fits", lambda r: r.update(first=1) or {"second": 2}, estimate_s=1)
    check.run("too long", lambda r: {}, estimate_s=60)

    def half(r):
        r["measured"] = 3
        raise RuntimeError("allocation failed")

    check.run("breaks", half)
    s = check.sections
    assert s["fits"]["status"] == "ok" and s["fits"]["first"] == 1 and s["fits"]["second"] == 2
    assert s["too long"]["status"] == "not run" and s["too long"]["reason"].startswith("time:")
    assert s["breaks"]["status"] == "failed" and s["breaks"]["measured"] == 3  # figures before the failure stay
    assert len(saves) == 3  # saved after every section


def test_the_carried_wheels_import_the_package_on_their_own(tmp_path):
    """The wheels `make gpu-wheels` carries to the GPU machine, installed alone into an empty folder,
    are what amp_deploy's recipe layer (pydantic) imports there."""
    import re

    wheels = re.search(r"^GPU_WHEELS\s*:=\s*(.+)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    dl = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                         "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "-d",
                         str(tmp_path / "whl"), *wheels], capture_output=True, text=True, timeout=300)
    if dl.returncode != 0 and "Could not find" not in dl.stderr:
        import pytest

        pytest.skip(f"no package index reachable to download the carried wheels: {dl.stderr.strip()[-200:]}")
    assert dl.returncode == 0, dl.stderr
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(site), *map(str, (tmp_path / "whl").glob("*.whl"))], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr
    code = ("import pydantic, pydantic_core, typing_extensions, amp_deploy.recipe as r; "
            "print(pydantic_core.__file__, typing_extensions.__file__); r.Recipe")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert all(p.startswith(str(site)) for p in run.stdout.split()), run.stdout  # the carried copies, not the venv's
