"""A block's shape as one value (issue 28, design): MLP width and head count travel together through
the search, rebuild, checkpoint, search.json, report and compare; files from before (widths alone,
or widths beside a second list of heads) keep loading and comparing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from amp_deploy.checkpoint import load_pruned_model, read_metadata, save_pruned
from amp_deploy.cli import app
from amp_deploy.measure.compare import compare, load_report, render_md
from amp_deploy.measure.report import heads_cut
from amp_deploy.prune.families import load_model
from amp_deploy.prune.rebuild import apply_shapes
from amp_deploy.prune.shape import (
    BlockShape,
    from_json,
    from_record,
    from_report,
    heads_of,
    recorded_shapes,
    shapes_of,
    to_json,
)


def test_shapes_read_from_every_record_kind():
    shapes = [BlockShape(96, 2), BlockShape(128, 4)]
    assert from_json(json.dumps(to_json(shapes))) == shapes == from_record({"shapes": to_json(shapes)})
    # search.json and checkpoint metadata from before shapes: lists, or JSON strings of them
    assert from_record({"widths": [96, 128], "heads": [2, 4]}) == shapes
    assert from_record({"widths": "[96, 128]", "heads": "[2, 4]"}) == shapes
    assert from_record({"original_widths": [192, 192]}, "original_") == [BlockShape(192), BlockShape(192)]
    assert from_record({"something": 1}) is None
    assert heads_of(shapes_of([1, 2])) is None and heads_of(shapes) == [2, 4]
    with pytest.raises(ValueError, match="2 widths but 1 head counts"):
        shapes_of([1, 2], [3])
    # a report from before heads (widths only): every head kept, no heads cut
    old = {"widths": {"original": [192, 192], "pruned": [96, 128]}}
    assert from_report(old, "pruned") == shapes_of([96, 128]) and not heads_cut(old)
    new = {"widths": {"original": [192, 192], "pruned": [96, 128]}, "heads": {"original": [4, 4], "pruned": [2, 4]}}
    assert from_report(new, "pruned") == shapes and heads_cut(new)


def _cut_model():
    torch.manual_seed(0)
    loaded = load_model("timm", "test_vit", False, {"depth": 2, "img_size": 32, "num_classes": 10})
    original = loaded.shapes()
    assert all(s.heads and s.heads > 1 for s in original)
    scores = [torch.rand(s.width) for s in original]
    heads = [torch.rand(s.heads) for s in original]
    apply_shapes(loaded, [BlockShape(s.width // 2, s.heads - 1) for s in original], scores, heads)
    return loaded, original


def test_a_checkpoint_records_shapes_and_one_written_before_them_still_loads(tmp_path):
    loaded, original = _cut_model()
    x = torch.randn(2, *loaded.input_size)
    with torch.no_grad():
        ref = loaded.model(x)
    path = tmp_path / "p.safetensors"
    save_pruned(loaded, path, original)
    meta = read_metadata(path)
    assert recorded_shapes(meta) == (loaded.shapes(), original)
    assert json.loads(meta["widths"]) == loaded.widths()  # for scripts that read the widths (DESIGN.md)

    # the same checkpoint as amp-deploy wrote it before shapes: widths, and heads in a list of their own
    old = {k: v for k, v in meta.items() if k not in ("shapes", "original_shapes")}
    old |= {"original_widths": json.dumps([s.width for s in original]), "heads": json.dumps(loaded.heads()),
            "original_heads": json.dumps([s.heads for s in original])}
    before = tmp_path / "before.safetensors"
    save_file(load_file(str(path)), str(before), metadata=old)
    back = load_pruned_model(before)
    assert back.shapes() == loaded.shapes()
    with torch.no_grad():
        assert torch.equal(back.model(x), ref)
    shown = CliRunner().invoke(app, ["inspect", str(before)])
    assert shown.exit_code == 0 and f"{loaded.heads()[0]} of {original[0].heads}" in shown.output, shown.output
    # widths alone (before heads were cut at all): every head kept
    widths_only = {k: v for k, v in old.items() if k not in ("heads", "original_heads")}
    assert recorded_shapes(widths_only) == (shapes_of(loaded.widths()), shapes_of([s.width for s in original]))


def test_an_old_search_json_and_old_reports_keep_rebuilding_and_comparing(tmp_path):
    assert recorded_shapes({"widths": [96, 128], "original_widths": [192, 192], "heads": [2, 4],
                          "original_heads": [4, 4]}) == ([BlockShape(96, 2), BlockShape(128, 4)],
                                                         [BlockShape(192, 4), BlockShape(192, 4)])
    assert recorded_shapes({"widths": [96, 128], "original_widths": [192, 192]}) == (shapes_of([96, 128]),
                                                                                     shapes_of([192, 192]))
    reports = []
    for i, heads in enumerate([None, {"original": [4, 4], "pruned": [2, 4]}]):
        rep = {"schema": "amp-deploy.report/1", "name": f"r{i}", "params": {"pruned": 10}, "flops": {"pruned": 20},
               "widths": {"original": [192, 192], "pruned": [96, 128]}, "fidelity": {"cosine_mean": 0.99},
               "runtimes": {}}
        if heads:
            rep["heads"] = heads
        (tmp_path / f"r{i}.json").write_text(json.dumps(rep))
        reports.append(tmp_path / f"r{i}.json")
    cmp = compare([load_report(r) for r in reports])
    assert [from_json(s["shapes"]) for s in cmp["summary"].values()] == [shapes_of([96, 128]),
                                                                          [BlockShape(96, 2), BlockShape(128, 4)]]
    md = render_md(cmp)
    assert "| widths | heads |" in md and "| 96 128 | n/a |" in md and "| 96 128 | 2 4 |" in md
