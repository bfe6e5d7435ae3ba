"""Resumable builds, the folder lock, interrupts, and bad input answered with exit code 2."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from amp_deploy.data import load_folder_data, to_rgb
from amp_deploy.errors import UserError
from amp_deploy.pipeline.lock import FolderLock
from amp_deploy.pipeline.stages import STAGE_NAMES
from amp_deploy.prune.families import read_state_dict

from .conftest import FAST, QUICKSTART, assert_one_line_error, build, tiny_recipe


def _cli(out, *extra, env=None):
    cmd = [sys.executable, "-m", "amp_deploy.cli", "build", str(QUICKSTART), "--out", str(out), *FAST, *extra]
    # SIGINT back to its default in the child: a shell that started us in the background ignores it,
    # and Python then never turns it into KeyboardInterrupt (a user's Ctrl-C always arrives)
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_build(quickstart, tmp_path):
    """Killed just before each of three files is renamed into place (scores, search, the pruned
    export), each rerun killed at the next one: the build that finally completes equals the
    uninterrupted quickstart build."""
    out = tmp_path / "out"
    for i, victim in enumerate(["scores.safetensors", "search.json", "pruned.onnx"]):
        killed = _cli(out, env={"AMP_DEPLOY_KILL_BEFORE": victim})
        assert killed.returncode == -signal.SIGKILL, (victim, killed.stderr)
        assert not (out / victim).exists() and list(out.glob(f".{victim}.*.tmp*"))  # written, never renamed
        assert (out / ".lock").exists()  # left behind by the dead process
        if i:  # a rerun: what the kill before left was cleared
            assert "left by an interrupted build" in killed.stderr
        if i == 2:  # and what finished before was kept
            assert "score: inputs unchanged, skipped" in killed.stderr
    again = _cli(out)
    assert again.returncode == 0, again.stderr
    assert "left by an interrupted build" in again.stderr and not list(out.glob(".*.tmp*"))
    ref, got = _report(quickstart[0]), _report(out)
    assert got["widths"] == ref["widths"]
    for k in ("original", "pruned"):
        assert got["runtimes"]["onnxruntime"]["parity"][k]["max_abs_err"] == pytest.approx(
            ref["runtimes"]["onnxruntime"]["parity"][k]["max_abs_err"], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_ctrl_c_exits_130_leaves_no_partial_file_and_resumes(tmp_path):
    out = tmp_path / "out"
    res = _cli(out, env={"AMP_DEPLOY_KILL_BEFORE": "search.json:INT"})
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and "interrupted" in res.stderr
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists() and not (out / "search.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["score"]
    again = _cli(out)
    assert again.returncode == 0 and "score: inputs unchanged, skipped" in again.stderr


def test_a_live_lock_refuses_a_second_build(tmp_path):
    """A build holding the folder's flock is never joined; where the filesystem has no flock, a live
    owner named in .lock is respected, and a reused pid (another start time) is not."""
    out = tmp_path / "out"
    out.mkdir()
    code = (f"import fcntl, os, time; fd = os.open({str(out / '.lock')!r}, os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from amp_deploy.pipeline import lock as L

        (out / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid,
                                                "start": L._start_time(holder.pid)}))
        with pytest.raises(UserError, match="another build"):
            FolderLock(out).__enter__()
    finally:
        holder.kill()
        holder.wait()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        import unittest.mock

        from amp_deploy.pipeline import lock as L

        with unittest.mock.patch.object(L, "_flock", lambda fd: None):  # a filesystem without flock
            (out / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid,
                                                    "start": L._start_time(holder.pid)}))
            with pytest.raises(UserError, match="if no build is running, delete"):
                FolderLock(out).__enter__()
            # the same pid, but another process start time: the pid was reused, the lock is stale
            (out / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "start": "1"}))
            with FolderLock(out):
                assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
            assert not (out / ".lock").exists()
    finally:
        holder.kill()


def test_a_lock_file_from_another_container_is_taken_once_the_kernel_lock_is_free(tmp_path):
    """Issue 38, finding 9: a build killed in a container left an owner file naming another host; the
    flock was free, yet no later container could take the folder."""
    (tmp_path / ".lock").write_text(json.dumps({"host": "some-other-container", "pid": 1, "start": "5"}))
    with FolderLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["host"] == os.uname().nodename


def test_a_dead_owners_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": "0"}))
    with FolderLock(tmp_path):
        pass


def test_truncated_safetensors_is_refused(tmp_path):
    good = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(100)}, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-50])
    assert_one_line_error(build(tiny_recipe(tmp_path, model={"source": "timm", "name": "test_vit", "pretrained": str(bad)}),
                 "--out", tmp_path / "o"), "not a readable safetensors file")
    assert not (tmp_path / "o").exists()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/amp_deploy_pwned",))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    path = tmp_path / "weights.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(UserError, match="weights_only=True"):
        read_state_dict(path)
    assert not os.path.exists("/tmp/amp_deploy_pwned")
    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "plain.pt")  # plain tensors load fine
    assert set(read_state_dict(tmp_path / "plain.pt")) == {"head.weight"}


def test_weights_for_another_model_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    assert_one_line_error(build(tiny_recipe(tmp_path, model={"source": "timm", "name": "test_vit", "pretrained": str(path)}),
                 "--out", tmp_path / "o"), "weights do not fit the model")


def test_nan_output_stops_at_the_stage_that_saw_it(tmp_path):
    import timm

    m = timm.create_model("test_vit", depth=2, img_size=32, num_classes=10)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["head.bias"][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    kwargs = {"depth": 2, "img_size": 32, "num_classes": 10}
    assert_one_line_error(build(tiny_recipe(tmp_path, model={"source": "timm", "name": "test_vit", "pretrained": str(path),
                                              "kwargs": kwargs}), "--out", tmp_path / "o"),
           "score: the model's output holds NaN or Inf")


def test_output_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(build(tiny_recipe(tmp_path), "--out", f), "is not a folder")


def test_no_space_left_is_a_clear_error(tmp_path, monkeypatch):
    from amp_deploy.pipeline.folder import BuildFolder

    def full(*_a, **_k):
        raise OSError(28, "No space left on device", "scores.safetensors")

    monkeypatch.setattr(BuildFolder, "write_scores", full)
    assert_one_line_error(build(tiny_recipe(tmp_path), "--out", tmp_path / "o"), "no space left on the device")


def test_debug_shows_the_traceback(tmp_path):
    from typer.testing import CliRunner

    from amp_deploy.cli import app

    res = CliRunner().invoke(app, ["--debug", "build", str(tmp_path / "none.yaml")])
    assert res.exit_code != 0 and isinstance(res.exception, UserError)


def _save(path, im):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def test_folder_images_of_every_mode_are_converted_and_bad_ones_skipped(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    _save(root / "gray.png", Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L"))
    _save(root / "rgba.png", Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA"))
    _save(root / "pal.png", Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("P"))
    _save(root / "deep.png", Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)))
    _save(root / "sub" / "rgb.jpg", Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "trunc.jpg").write_bytes((root / "sub" / "rgb.jpg").read_bytes()[:60])
    import torchvision.transforms as T

    data = load_folder_data(str(root), calibration=2, validation=2, holdout=1, seed=0,
                            transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))
    cal = [x for x, _ in data.calibration.batches(8)]  # streamed: a broken file is skipped and counted as it is read
    assert sum(len(x) for x in cal) + data.calibration.skipped == 2 and all(x.shape[1:] == (3, 8, 8) for x in cal)
    assert data.holdout.images.shape == (1, 3, 8, 8) and data.validation.images.shape == (2, 3, 8, 8)
    every = load_folder_data(str(root), calibration=7, validation=0, holdout=0, seed=0,
                             transform=T.Compose([T.Resize((8, 8)), T.ToTensor()])).calibration
    assert sum(len(x) for x, _ in every.batches(3)) == 5 and every.skipped == 2
    deep = to_rgb(Image.open(root / "deep.png"))
    assert deep.mode == "RGB" and np.asarray(deep).max() > 100  # 16-bit scaled, not clipped to white
    with pytest.raises(UserError, match="has 7 images but the recipe asks for 8"):
        load_folder_data(str(root), calibration=3, validation=2, holdout=3, seed=0, transform=T.ToTensor())
    with pytest.raises(UserError, match=r"\(2 unreadable skipped\) has 5 images but the recipe asks for 7"):
        load_folder_data(str(root), calibration=0, validation=4, holdout=3, seed=0, transform=T.ToTensor())


def test_empty_folder_and_too_few_images_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    data = {"source": "folder", "path": str(empty), "calibration": 4, "validation": 4, "holdout": 2, "batch_size": 4}
    assert_one_line_error(build(tiny_recipe(tmp_path, data=data), "--out", tmp_path / "o"), "no image files")
    assert not (tmp_path / "o").exists()


def test_another_machine_recompiles_and_revalidates_but_keeps_the_pruning(monkeypatch):
    from amp_deploy.pipeline import manifest
    from amp_deploy.pipeline.stages import STAGES
    from amp_deploy.recipe import load_recipe

    recipe = load_recipe(QUICKSTART)
    here = manifest.stage_keys(recipe, STAGES)
    monkeypatch.setattr(manifest, "machine", lambda: {"tensorrt": "10.13.0", "gpu": "NVIDIA H100", "host": "x", "cpus": 16})
    there = manifest.stage_keys(recipe, STAGES)
    for stage in ("score", "search", "rebuild", "export"):
        assert here[stage] == there[stage]
    assert here["compile"] != there["compile"] and here["validate"] != there["validate"]


def test_a_resumed_build_does_not_reread_unchanged_files(tmp_path, monkeypatch):
    import amp_deploy.files as private

    recipe, out = tiny_recipe(tmp_path), tmp_path / "o"
    assert build(recipe, "--out", out).exit_code == 0
    calls = []
    real = private.hash_file
    monkeypatch.setattr(private, "hash_file", lambda p: calls.append(Path(p).name) or real(p))
    res = build(recipe, "--out", out)
    assert res.exit_code == 0 and res.output.count("inputs unchanged") == len(STAGE_NAMES)  # every stage, distill and quantize (off) too
    assert calls == []  # sizes and mtimes match the manifest: no file was read again
    onnx_file = out / "pruned.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")  # a changed file is hashed and redone
    res = build(recipe, "--out", out)
    assert "pruned.onnx" in calls and "export: done" in res.output
