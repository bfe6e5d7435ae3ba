"""Issue 17: defects found by review in distillation, data, fidelity and transformers towers, and the
bad input on the new surfaces. Each test failed before its fix (see the issue note)."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from .conftest import assert_one_line_error, build, tiny_recipe

# --- 1. a rank with an empty share of the last batch -------------------------------------------------


def _setup17():
    from amp_deploy.prune.families import load_timm

    torch.manual_seed(0)
    teacher = load_timm("test_vit", False, {"depth": 2, "img_size": 32, "num_classes": 10}).model
    torch.manual_seed(1)
    student = load_timm("test_vit", False, {"depth": 2, "img_size": 32, "num_classes": 10}).model
    return student, teacher, torch.randn(17, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _train17(student, teacher, images):
    from amp_deploy.prune.distill import distill

    # 17 images, batch 8: the last global batch holds 1 image, so one of two processes gets none
    return distill(student, teacher, images, epochs=1, lr=1e-3, batch_size=8, warmup=0.5, weight_decay=0.05,
                   loss="kl", temperature=2.0, seed=3)


def _rank17(rank, world, store, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        student, teacher, images = _setup17()
        _train17(student, teacher, images)
        if rank == 0:
            torch.save(student.state_dict(), out)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_a_rank_with_no_image_in_the_last_batch_still_joins_and_matches_one_process(tmp_path):
    student, teacher, images = _setup17()
    torch.set_num_threads(1)
    _train17(student, teacher, images)
    mp.spawn(_rank17, args=(2, str(tmp_path / "store"), str(tmp_path / "two.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5)


# --- 2. readable class names -------------------------------------------------------------------------


def test_wordnet_ids_become_readable_names_and_a_names_file_wins(tmp_path):
    from amp_deploy.data import readable_class_names
    from amp_deploy.errors import UserError

    assert readable_class_names(["n01440764", "n01443537"]) == ["tench", "goldfish"]
    assert readable_class_names(["n00004475"]) == ["organism"]  # beyond ImageNet-1k: timm's lemmas
    assert readable_class_names(["ankle_boot", "t-shirt"]) == ["ankle boot", "t shirt"]
    names = tmp_path / "names.txt"
    names.write_text("a fish\na bird\n")
    assert readable_class_names(["n01440764", "n99999999"], str(names)) == ["a fish", "a bird"]
    with pytest.raises(UserError, match="no readable name for the WordNet ids n99999999"):
        readable_class_names(["n01440764", "n99999999"])
    with pytest.raises(UserError, match="has 2 names for 3 class folders"):
        readable_class_names(["a", "b", "c"], str(names))


def test_image_text_scoring_without_readable_names_is_one_line(tmp_path):
    root = tmp_path / "imgs"
    for k, wnid in enumerate(["n99999998", "n99999999"]):
        (root / wnid).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((20, 20, 3), 40 * k + i, np.uint8)).save(root / wnid / f"{i}.png")
    model = {"source": "open_clip", "name": "ViT-B-32", "kwargs": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}}
    data = {"source": "folder", "path": str(root), "calibration": 8, "validation": 8, "holdout": 8, "batch_size": 8,
            "workers": 0}
    recipe = tiny_recipe(tmp_path, model=model, data=data, prune={"loss_view": "image-text", "steps": 2})
    assert_one_line_error(build(recipe, "--out", tmp_path / "out"), "no readable name for the WordNet ids n99999998")


# --- 3. DataLoader workers under spawn ---------------------------------------------------------------


def test_the_loader_runs_under_the_spawn_start_method(tmp_path):
    from amp_deploy.data import FileImages, Stream, SyntheticImages
    from amp_deploy.prune.families import load_timm

    tf = load_timm("test_vit", False, {"depth": 1, "img_size": 32}).transform
    for i in range(5):
        Image.fromarray(np.full((20, 20, 3), i * 30, np.uint8)).save(tmp_path / f"{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    for load in (FileImages(files), SyntheticImages(0, 0, (20, 20))):
        pickle.dumps(load)
        stream = Stream(load, 5, None, tf, workers=1)
        stream.items.__class__  # noqa: B018
        loader = torch.utils.data.DataLoader(stream.items, batch_size=2, num_workers=1,
                                             multiprocessing_context="spawn", collate_fn=_collate_spawn)
        assert sum(len(x) for x in loader) == 5


def _collate_spawn(items):
    return torch.stack([it[0] for it in items if it is not None])


# --- 4. distillation images are streamed -------------------------------------------------------------


def test_distillation_reads_a_stream_batch_by_batch_and_counts_unreadable(tmp_path):
    from amp_deploy.data import FileImages, Stream
    from amp_deploy.prune.distill import distill
    from amp_deploy.prune.families import load_timm

    for i in range(10):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "10.png").write_bytes(b"broken")
    torch.manual_seed(0)
    teacher = load_timm("test_vit", False, {"depth": 1, "img_size": 32, "num_classes": 10})
    student = load_timm("test_vit", False, {"depth": 1, "img_size": 32, "num_classes": 10})
    stream = Stream(FileImages(sorted(tmp_path.glob("*.png"))), 11, None, teacher.transform, workers=0)
    seen = []
    state = distill(student.model, teacher.model, stream, epochs=1, lr=1e-4, batch_size=4, warmup=0,
                    weight_decay=0.0, loss="kl", on_step=lambda n, loss: seen.append(n))
    assert sum(seen) == 10 and stream.skipped == 1 and len(state.losses) == 1


# --- 5. weighted k-NN ---------------------------------------------------------------------------------


def test_knn_is_the_weighted_vote_of_dino():
    from amp_deploy.measure.metrics import knn_top1

    # 3 neighbours: two of class 0 at cosine 0.5, one of class 1 at cosine 0.9. Summed cosine says
    # class 0 (1.0 > 0.9); exp(cos / 0.07) says class 1 (exp(12.9) > 2 exp(7.1)).
    bank = torch.tensor([[0.5, math.sqrt(0.75), 0.0], [0.5, -math.sqrt(0.75), 0.0], [0.9, 0.0, math.sqrt(0.19)]])
    labels = torch.tensor([0, 0, 1])
    assert knn_top1(bank, labels, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([1]), k=3) == 100.0


# --- 7, 8. transformers towers: their own processors, the attention kernel kept -------------------------


def test_transformers_towers_use_their_own_processor_settings():
    from amp_deploy.prune.families import load_model

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "patch_size": 8}
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8))  # 2:1
    dino = load_model("transformers", "Dinov2Model", False, {"config": {**small, "image_size": 518}})
    assert dino.input_size == (3, 224, 224)  # the processor's crop, not config.image_size 518
    from transformers import BitImageProcessor

    ref = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    torch.testing.assert_close(dino.transform(im), ref(images=im, return_tensors="pt")["pixel_values"][0])
    vit = load_model("transformers", "ViTModel", False, {"config": {**small, "image_size": 32},
                                                         "processor": {"size": {"height": 32, "width": 32}}})
    assert vit.input_size == (3, 32, 32) and vit.transform(im).shape == (3, 32, 32)  # resized straight, no crop


def test_the_attention_implementation_survives_the_pruned_checkpoint(tmp_path):
    from amp_deploy.checkpoint import load_pruned_model, save_pruned
    from amp_deploy.prune.families import load_model
    from amp_deploy.prune.rebuild import apply_widths
    from amp_deploy.prune.shape import shapes_of

    cfg = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "patch_size": 8, "image_size": 32}
    loaded = load_model("transformers", "ViTModel", False, {"config": cfg, "attn_implementation": "eager",
                                                            "processor": {"size": {"height": 32, "width": 32}}})
    apply_widths(loaded, None, [40, 24])
    save_pruned(loaded, tmp_path / "p.safetensors", shapes_of([64, 64]))
    back = load_pruned_model(tmp_path / "p.safetensors")
    assert back.model.model.config._attn_implementation == "eager"
    assert back.input_size == loaded.input_size and back.widths() == [40, 24]


# --- 9. no weight decay on norms, biases, position embeddings and tokens --------------------------------


def test_adamw_does_not_decay_norms_biases_embeddings_and_tokens():
    from amp_deploy.prune.distill import param_groups
    from amp_deploy.prune.families import load_timm

    model = load_timm("vit_small_patch14_reg4_dinov2", False, {"depth": 1, "img_size": 28, "embed_dim": 32,
                                                                "num_heads": 2}).model
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "reg_token", "blocks.0.norm1.weight", "blocks.0.mlp.fc1.bias",
            "blocks.0.ls1.gamma"} <= skipped
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.weight"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


# --- 10. an unexpected failure inside a stage is one line naming the stage ---------------------------------


def test_an_unexpected_failure_in_a_stage_is_one_line(tmp_path, monkeypatch):
    from amp_deploy.measure import metrics

    def boom(*a, **k):
        raise AssertionError("Expected gradient function to be set")

    monkeypatch.setattr(metrics, "count_flops", boom)
    res = build(tiny_recipe(tmp_path), "--out", tmp_path / "out")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "stage 'validate' failed: AssertionError: Expected gradient function" in errors[0]
    assert not (tmp_path / "out" / "report.json").exists()


# --- bad input on the new surfaces ------------------------------------------------------------------------


def test_non_finite_numbers_are_refused_in_the_recipe(tmp_path):
    for override, needle in (("distill.warmup=.inf", "distill.warmup"), ("distill.lr=.nan", "distill.lr"),
                             ("prune.threshold=.inf", "prune.threshold")):
        assert_one_line_error(build(tiny_recipe(tmp_path), "--out", tmp_path / "o", override), needle)
    assert not (tmp_path / "o").exists()


def test_yaml_1_2_floats_are_numbers(tmp_path):
    from amp_deploy.recipe import load_recipe

    path = tiny_recipe(tmp_path)
    path.write_text(path.read_text() + "distill:\n  lr: 1e-3\n  epochs: 0\n")
    r = load_recipe(path, ["prune.threshold=2e-2"])
    assert r.distill.lr == 1e-3 and r.prune.threshold == 2e-2


def test_a_diverging_distillation_is_not_kept(tmp_path):
    res = build(tiny_recipe(tmp_path), "--out", tmp_path / "out", "distill.epochs=2", "distill.lr=1e30")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "lower distill.lr" in errors[0], res.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "distill" not in manifest["stages"] and not (tmp_path / "out" / "pruned.safetensors").exists()


def test_workers_beyond_the_machine_and_a_distill_path_without_a_folder_are_refused(tmp_path):
    assert_one_line_error(build(tiny_recipe(tmp_path), "--out", tmp_path / "o", "data.workers=10000"),
                          "data.workers: 10000 is more than this machine's")
    assert_one_line_error(build(tiny_recipe(tmp_path), "--out", tmp_path / "o", f"distill.path={tmp_path}"),
                          "distill.path works with data.source folder")


def test_an_unreadable_calibration_set_is_one_line(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(40):
        if i < 30:
            Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(root / f"{i:02d}.png")
        else:
            (root / f"{i:02d}.png").write_bytes(b"not an image")
    data = {"source": "folder", "path": str(root), "calibration": 10, "validation": 8, "holdout": 8,
            "batch_size": 8, "workers": 0, "seed": 0}
    # the calibration images are the first 10 of the seeded order: make exactly those unreadable
    from amp_deploy.data import folder_order

    files, _, _ = folder_order(root, 0)
    for f in files[:10]:
        f.write_bytes(b"broken")
    res = build(tiny_recipe(tmp_path, data=data), "--out", tmp_path / "out")
    assert_one_line_error(res, "score: no calibration image could be read")


@pytest.mark.parametrize("config,needle", [
    ("'a string'", "model.kwargs.config: expected a mapping"),
    ("[1, 2]", "model.kwargs.config: expected a mapping"),
    ("{patch_size: 0}", "model.kwargs.config.patch_size: must be positive"),
    ("{image_size: 0}", "model.kwargs.config.image_size: must be positive"),
])
def test_bad_transformers_configs_are_one_line(tmp_path, config, needle):
    recipe = tiny_recipe(tmp_path, model={"source": "transformers", "name": "ViTModel"})
    assert_one_line_error(build(recipe, "--out", tmp_path / "o", f"model.kwargs.config={config}"), needle)


def test_a_checkpoint_folder_loads_and_weights_that_do_not_match_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import ViTConfig, ViTModel

    from amp_deploy.prune.families import load_model

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8,
                    image_size=32)
    good = tmp_path / "good"
    ViTModel(cfg).save_pretrained(good)
    loaded = load_model("transformers", "ViTModel", str(good), {})
    assert loaded.widths() == [64]
    model = {"source": "transformers", "name": "ViTModel", "pretrained": str(good),
             "kwargs": {"processor": {"size": {"height": 32, "width": 32}}}}
    res = build(tiny_recipe(tmp_path, model=model), "--out", tmp_path / "o", "runtimes=[]")
    assert res.exit_code == 0, res.output  # model.pretrained: DIR, as the README says
    wrong = tmp_path / "wrong"
    ViTModel(cfg).save_pretrained(wrong)
    state = load_file(wrong / "model.safetensors")
    save_file({f"other.{k}": v for k, v in state.items()}, wrong / "model.safetensors", metadata={"format": "pt"})
    recipe = tiny_recipe(tmp_path, model={**model, "pretrained": str(wrong)})
    assert_one_line_error(build(recipe, "--out", tmp_path / "o2"), "the weights do not match ViTModel (missing keys")


def test_a_distill_checkpoint_from_other_settings_says_so(tmp_path):
    from amp_deploy.pipeline.folder import BuildFolder

    folder = BuildFolder(tmp_path, distilled=True)
    said = []
    assert folder.read_distill_checkpoint("abc", said.append) is None and said == []  # none: nothing to say
    folder.distill_checkpoint.write_bytes(b"truncated")
    assert folder.read_distill_checkpoint("abc", said.append) is None
    assert said and "is unreadable" in said[0] and "starting over" in said[0]
