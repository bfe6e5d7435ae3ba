from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from amp_deploy import digits
from amp_deploy.errors import UserError
from amp_deploy.recipe import load_recipe, parse_override, recipe_problems

from .conftest import QUICKSTART, REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_is_valid_and_says_how_to_run_it(path, tmp_path):
    doc = yaml.safe_load(path.read_text())
    # A recipe for the user's own images names a folder they pass on the command line.
    overrides = [f"data.path={tmp_path}"] if doc["data"]["source"] == "folder" else []
    weights = doc["model"].get("pretrained")
    if isinstance(weights, str) and not (path.parent / weights).exists():  # made by `make real-model`
        overrides.append("model.pretrained=false")
    distill_path = doc.get("distill", {}).get("path")
    if distill_path and not (path.parent / distill_path).is_dir():  # made by `make real-model` too
        overrides.append(f"distill.path={tmp_path}")
    recipe = load_recipe(path, overrides)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# amp-deploy build recipes/{path.name}")
    assert recipe.name and recipe.runtimes


def test_quickstart_model_kwargs_match_the_embedded_model():
    assert load_recipe(QUICKSTART).model.kwargs == digits.MODEL_KWARGS


def _write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _base() -> dict:
    return {"name": "t", "model": {"source": "timm", "name": "test_vit"}}


def test_overrides_are_typed_and_dotted(tmp_path):
    r = load_recipe(_write(tmp_path, _base()), ["prune.threshold=0.02", "validate.batch_sizes=[1, 4]",
                                                "prune.cache=false"])
    assert r.prune.threshold == 0.02 and r.validate_.batch_sizes == [1, 4] and r.prune.cache is False


@pytest.mark.parametrize("doc_patch, needle", [
    ({"prune": {"threshhold": 0.1}}, "prune.threshhold: unknown key"),
    ({"prune": {"threshold": "0.1"}}, "prune.threshold: Input should be a valid number"),
    ({"prune": {"threshold": -1.0}}, "prune.threshold"),
    ({"prune": {"search": "uniform"}}, "prune.keep_ratio is required"),
    ({"prune": {"keep_ratio": 1.5}}, "prune.keep_ratio"),
    ({"prune": {"align": 0}}, "prune.align"),
    ({"export": {"batch": {"min": 8, "opt": 4, "max": 2}}}, "min <= opt <= max"),
    ({"model": {"source": "timm", "name": "test_vit", "pretrained": "nope.safetensors"}}, "weights file not found"),
    ({"data": {"source": "folder", "path": "no/such/dir"}}, "data.path: not a directory"),
])
def test_bad_recipes_name_the_key(tmp_path, doc_patch, needle):
    doc = _base()
    for k, v in doc_patch.items():
        doc[k] = v
    with pytest.raises(UserError) as e:
        load_recipe(_write(tmp_path, doc))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_problem_is_reported_at_once():
    _, problems = recipe_problems({"name": "t", "model": {"name": "x", "bogus": 1}, "prune": {"steps": "6"}})
    assert any("model.bogus" in p for p in problems) and any("prune.steps" in p for p in problems)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nmodel:\n  name: [oops\n")
    with pytest.raises(UserError, match=r"line \d+"):
        load_recipe(p)


@pytest.mark.parametrize("item", ["noequals", "=3", "a..b=1"])
def test_malformed_override(item):
    with pytest.raises(UserError):
        parse_override(item)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["name", "model", "data", "prune", "export", "runtimes", "validate", "x"]),
                           json_values, max_size=6))
def test_random_documents_never_crash_the_parser(doc):
    recipe, problems = recipe_problems(doc)
    assert (recipe is None) == bool(problems)


def test_a_key_given_twice_is_an_error_with_its_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nmodel: {name: test_vit}\nprune:\n  threshold: 0.1\n  threshold: 0.2\n")
    with pytest.raises(UserError, match=r"line 5, column 3: .*duplicate key 'threshold'"):
        load_recipe(p)


def test_a_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_recipe(tmp_path)


def test_check_keys_documents_every_key():
    from typer.testing import CliRunner

    from amp_deploy.cli import app
    from amp_deploy.recipe import key_docs

    rows = key_docs()
    assert all(desc for _, _, desc in rows), [k for k, _, d in rows if not d]
    keys = {k for k, _, _ in rows}
    assert {"prune.threshold", "validate.parity_reduced.max_abs_err", "export.batch.min"} <= keys
    assert dict((k, d) for k, d, _ in rows)["validate.parity_reduced.max_abs_err"] == "0.05"
    res = CliRunner().invoke(app, ["check", "--keys"], terminal_width=200)
    assert res.exit_code == 0 and "prune.threshold" in res.output


def test_batch_sizes_outside_the_export_range_and_bf16_before_opset_22_are_refused():
    _, problems = recipe_problems({"name": "x", "model": {"name": "test_vit"}, "export": {"batch": {"min": 2, "opt": 4,
                                  "max": 8}}, "validate": {"batch_sizes": [1, 8]}})
    assert any("[1] are outside export.batch [2, 8]" in p for p in problems), problems
    _, problems = recipe_problems({"name": "x", "model": {"name": "test_vit"}, "compile": {"precision": "bf16"}})
    assert any("bf16 needs export.opset >= 22" in p for p in problems), problems
    recipe, problems = recipe_problems({"name": "x", "model": {"name": "test_vit"}, "compile": {"precision": "bf16"},
                                        "export": {"opset": 22}})
    assert recipe is not None, problems


def _reduced_model(doc: dict) -> dict:
    """The recipe's own architecture, shallow and narrow: one block, the family's MLP shape and ratio."""
    m = doc["model"]
    if m["source"] == "open_clip":
        import open_clip

        vision = {**open_clip.get_model_config(m["name"])["vision_cfg"], "layers": 1, "width": 64, "head_width": 32,
                  "image_size": 28, "patch_size": 14}
        if vision.get("timm_model_name", "").startswith("eva02_"):  # a timm tower inside open_clip (EVA-CLIP):
            # open_clip passes it no depth or image size: the family's smallest, at its own 224x224
            vision.update(timm_model_name="eva02_tiny_patch14_224", image_size=224)
        text = {"context_length": 8, "width": 32, "heads": 2, "layers": 1, "vocab_size": 500}
        return {"source": "open_clip", "name": m["name"], "pretrained": False,
                "kwargs": {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}}
    if m["source"] == "transformers":  # the real model's architecture (Dinov2Model), one narrow layer
        config = {"hidden_size": 96, "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 14}
        return {**m, "pretrained": False, "kwargs": {**m.get("kwargs", {}), "config": config}}
    size = 28 if "patch14" in m["name"] else 32
    kwargs = {**m.get("kwargs", {}), "depth": 1, "img_size": size, "embed_dim": 96, "num_heads": 2}
    return {**m, "pretrained": False, "kwargs": kwargs}


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name != "quickstart.yaml"],
                         ids=[p.name for p in RECIPES if p.name != "quickstart.yaml"])
def test_every_recipe_architecture_prunes_exports_and_keeps_parity_depth_reduced(path, tmp_path):
    import json

    from .conftest import build

    doc = yaml.safe_load(path.read_text())
    doc["model"] = _reduced_model(doc)
    doc["data"] = {"source": "synthetic", "calibration": 8, "validation": 8, "holdout": 4, "batch_size": 4}
    for key in ("path", "images"):  # a folder to distil on goes with folder data
        doc.get("distill", {}).pop(key, None)
    if doc.get("distill", {}).get("epochs"):  # one epoch of the recipe's own distillation (sharding, precision)
        doc["distill"]["epochs"] = 1
    doc["export"]["batch"] = {"min": 1, "opt": 2, "max": 4}
    doc["runtimes"] = ["onnxruntime"]
    doc["validate"] = {"batch_sizes": [1, 4], "warmup": 1, "iterations": 2}
    res = build(_write(tmp_path, doc), "--out", tmp_path / "out")  # the recipe's prune and compile settings as they are
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["runtimes"]["onnxruntime"]["parity"]["max_abs_err"] <= 1e-4
    align = doc.get("prune", {}).get("align", 1)
    assert all(w % align == 0 or w == h for w, h in zip(rep["widths"]["pruned"], rep["widths"]["original"]))

