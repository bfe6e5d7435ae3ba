"""Real data at scale: ImageNet-style folders with labels, streamed with workers; the paper's fidelity
measures (top-1, zero-shot top-1, k-NN top-1); weights from disk with the hub offline; bad data."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import assert_one_line_error, build, tiny_recipe

CLASSES = [f"class_{c}" for c in "abcdefghij"]
MODES = ["RGB", "L", "RGBA", "P", "I;16"]


def _image(rng, size, mode):
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
    return im.convert(mode)


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    """10 class folders, 30 images each, of odd sizes and modes; two unreadable files."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(30):
            size = (int(rng.integers(17, 61)), int(rng.integers(17, 61)))
            _image(rng, size, MODES[(k + i) % len(MODES)]).save(root / name / f"{i}.png")
    (root / "class_a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "class_b" / "cut.png").write_bytes((root / "class_b" / "0.png").read_bytes()[:40])
    return root


def _folder_recipe(tmp_path, root, model, **extra):
    data = {"source": "folder", "path": str(root), "calibration": 120, "validation": 32, "holdout": 60,
            "batch_size": 16, "workers": 2}
    return tiny_recipe(tmp_path, model=model, data=data, **extra)


def _built(tmp_path, recipe, *overrides):
    out = tmp_path / "out"
    res = build(recipe, "--out", out, *overrides)
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text())


def test_a_classifier_gets_top1_from_the_folder_labels(tmp_path, imagenet_folder):
    model = {"source": "timm", "name": "test_vit", "kwargs": {"depth": 2, "img_size": 32, "num_classes": 10}}
    rep = _built(tmp_path, _folder_recipe(tmp_path, imagenet_folder, model))
    assert rep["data"]["classes"] == CLASSES
    fid = rep["fidelity"]
    assert 0 <= fid["accuracy_original"] <= 100 and 0 <= fid["accuracy_pruned"] <= 100
    assert rep["data"]["calibration"] == 120 and rep["data"]["holdout"] == 60
    assert "knn_top1" not in fid and "zero_shot_top1" not in fid


def test_an_embedding_model_gets_knn_top1_against_the_calibration_features(tmp_path, imagenet_folder):
    model = {"source": "timm", "name": "test_vit", "kwargs": {"depth": 2, "img_size": 32, "num_classes": 0}}
    rep = _built(tmp_path, _folder_recipe(tmp_path, imagenet_folder, model), "distill.epochs=1")
    knn = rep["fidelity"]["knn_top1"]
    assert knn["k"] == 20 and 0 <= knn["original"] <= 100 and 0 <= knn["pruned"] <= 100
    assert rep["fidelity"]["accuracy_original"] is None
    before = rep["fidelity"]["before_distill"]["knn_top1"]  # the pruned model before distillation, same bank
    assert isinstance(before, float) and 0 <= before <= 100
    md = (tmp_path / "out" / "report.md").read_text()
    assert "k-NN top-1 (k = 20" in md and f"| k-NN top-1 % | {before:.2f} | {knn['pruned']:.2f} |" in md


def test_an_open_clip_model_gets_zero_shot_top1_with_the_class_prompts(tmp_path, imagenet_folder):
    model = {"source": "open_clip", "name": "ViT-B-32", "kwargs": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}}
    rep = _built(tmp_path, _folder_recipe(tmp_path, imagenet_folder, model))
    zs = rep["fidelity"]["zero_shot_top1"]
    assert 0 <= zs["original"] <= 100 and 0 <= zs["pruned"] <= 100
    assert "knn_top1" in rep["fidelity"]
    assert "zero-shot top-1" in (tmp_path / "out" / "report.md").read_text()


def test_unreadable_files_are_skipped_and_counted(tmp_path, imagenet_folder):
    from amp_deploy.data import load_folder_data

    data = load_folder_data(str(imagenet_folder), calibration=302, validation=0, holdout=0, seed=0,
                            transform=lambda im: torch.zeros(3, 4, 4), workers=2)
    read = sum(len(x) for x, _ in data.calibration.batches(64))
    assert read == 300 and data.calibration.skipped == 2


def test_the_embedded_model_scores_the_same_through_a_class_folder_as_through_digits(tmp_path):
    from amp_deploy import digits
    from amp_deploy.data import digits_images, digits_split, load_folder_data
    from amp_deploy.prune.families import load_timm

    images, labels = digits_images()
    test = digits_split()[1]
    root = tmp_path / "digits"
    for i in test:  # the 360 test digits as a class folder tree: 0/ ... 9/
        (root / str(labels[i])).mkdir(parents=True, exist_ok=True)
        images[i].save(root / str(labels[i]) / f"{i}.png")
    loaded = load_timm(digits.MODEL_NAME, str(digits.ASSET), digits.MODEL_KWARGS)
    data = load_folder_data(str(root), calibration=1, validation=1, holdout=358, seed=0, transform=loaded.transform)
    ids = [int(p.stem) for p in data.holdout_files]
    assert data.classes == [str(c) for c in range(10)]
    assert data.holdout.labels.tolist() == [int(labels[i]) for i in ids]  # class index = sorted folder position
    with torch.no_grad():
        via_folder = loaded.model(data.holdout.images).argmax(-1)
        via_digits = loaded.model(torch.stack([loaded.transform(images[i]) for i in ids])).argmax(-1)
    assert torch.equal(via_folder, via_digits)
    top1 = (via_folder == data.holdout.labels).float().mean().item()
    assert top1 == (via_digits == torch.as_tensor(labels[ids])).float().mean().item() and top1 > 0.9


# --- weights from disk, the hub offline ---------------------------------------------------------------------


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_timm_and_open_clip_weights_load_from_a_path_offline(tmp_path, offline):
    # offline here is the environment only (the hub client read it at import); a local path never asks the hub
    from safetensors.torch import save_file

    from amp_deploy.prune.families import load_model

    kw = {"timm": ("test_vit", {"depth": 1, "img_size": 32, "num_classes": 10}),
          "open_clip": ("ViT-B-32", {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                        "patch_size": 16, "head_width": 16}, "text_cfg": {"context_length": 8, "width": 16,
                        "heads": 1, "layers": 1, "vocab_size": 500}})}
    for source, (name, kwargs) in kw.items():
        torch.manual_seed(1)
        a = load_model(source, name, False, kwargs)
        full = a.model if source == "timm" else None
        if source == "open_clip":
            import open_clip

            torch.manual_seed(1)
            full = open_clip.create_model(name, **kwargs)
        path = tmp_path / f"{source}.safetensors"
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
        torch.manual_seed(2)  # another init: only the file can make the two agree
        b = load_model(source, name, str(path), kwargs)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(b.model(x), a.model.eval()(x))
        bin_path = tmp_path / f"{source}.pth"
        torch.save(full.state_dict(), bin_path)  # a .pth state dict, read with weights_only=True
        torch.manual_seed(3)
        c = load_model(source, name, str(bin_path), kwargs)
        with torch.no_grad():
            torch.testing.assert_close(c.model(x), a.model(x))


@pytest.mark.parametrize("model", [
    {"source": "timm", "name": "vit_tiny_patch16_224", "pretrained": True},
    {"source": "open_clip", "name": "ViT-B-32", "pretrained": True, "kwargs": {"pretrained": "laion2b_s34b_b79k"}},
], ids=["timm", "open_clip"])
def test_pretrained_true_with_the_hub_offline_and_no_cache_is_one_line(tmp_path, model):
    import subprocess
    import sys

    # a fresh process: the hub client reads HF_HUB_OFFLINE when it is imported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "o"
    res = subprocess.run([sys.executable, "-m", "amp_deploy.cli", "build", str(tiny_recipe(tmp_path, model=model)),
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
    assert "model.pretrained" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in lines[0]
    assert "model.safetensors" in lines[0] or ".bin" in lines[0]  # names the file it looked for
    assert not (out / "scores.safetensors").exists()


# --- bad data ---------------------------------------------------------------------------------------------


def test_a_class_folder_with_no_image_is_one_line_before_anything_is_written(tmp_path, imagenet_folder):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(imagenet_folder, root)
    (root / "class_z").mkdir()
    (root / "class_z" / "notes.txt").write_text("no images here")
    model = {"source": "timm", "name": "test_vit", "kwargs": {"depth": 1, "img_size": 32, "num_classes": 11}}
    out = tmp_path / "o"
    assert_one_line_error(build(_folder_recipe(tmp_path, root, model), "--out", out), "class folder 'class_z'")
    assert not out.exists()


def test_class_folders_that_do_not_match_a_classifier_are_refused(tmp_path, imagenet_folder):
    model = {"source": "timm", "name": "test_vit", "kwargs": {"depth": 1, "img_size": 32, "num_classes": 7}}
    out = tmp_path / "o"
    assert_one_line_error(build(_folder_recipe(tmp_path, imagenet_folder, model), "--out", out),
                          "10 class folders but the model has 7 classes")
    assert not out.exists()


def test_a_file_that_breaks_the_transform_in_a_worker_is_skipped_and_counted(tmp_path, imagenet_folder):
    from amp_deploy.data import load_folder_data

    def fragile(im):
        if im.size[0] == 23:  # stands for a file that crashes the decoder or transform in a worker
            raise RuntimeError("boom")
        return torch.zeros(3, 4, 4)

    n = sum(1 for p in imagenet_folder.rglob("*.png") if (lambda i: i is not None and i.size[0] == 23)(_try_open(p)))
    data = load_folder_data(str(imagenet_folder), calibration=302, validation=0, holdout=0, seed=0,
                            transform=fragile, workers=2)
    read = sum(len(x) for x, _ in data.calibration.batches(32))
    assert n > 0 and data.calibration.skipped == 2 + n and read == 300 - n


def _try_open(p):
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except OSError:
        return None


# --- the CLIP criterion with the text tower -----------------------------------------------------------------


def test_image_text_entropy_averages_both_directions():
    from amp_deploy.prune.score import image_text_entropy

    flat = image_text_entropy(torch.ones(4, 8), torch.ones(3, 8), 15.0)  # every similarity equal
    torch.testing.assert_close(flat, torch.full((4,), 0.5 * np.log(3) + 0.5 * np.log(4)))
    sharp = image_text_entropy(torch.eye(3, 8) * 5, torch.eye(3, 8), 50.0)  # image i matches prompt i alone
    assert sharp.max() < 1e-3


def test_loss_view_image_text_scores_with_the_class_prompts(tmp_path, imagenet_folder):
    from safetensors.torch import load_file

    model = {"source": "open_clip", "name": "ViT-B-32", "kwargs": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}}
    outs = {}
    for view in ("image-image", "image-text"):
        recipe = _folder_recipe(tmp_path, imagenet_folder, model, prune={"threshold": 0.05, "steps": 3,
                                                                         "loss_view": view})
        outs[view] = tmp_path / view
        assert build(recipe, "--out", outs[view]).exit_code == 0
    a, b = (load_file(outs[v] / "scores.safetensors") for v in ("image-image", "image-text"))
    assert not torch.allclose(a["abs.0"], b["abs.0"])
    bad = tiny_recipe(tmp_path, prune={"loss_view": "image-text"})  # a timm model on synthetic images
    assert_one_line_error(build(bad, "--out", tmp_path / "bad"), "image-text needs an open_clip model")
