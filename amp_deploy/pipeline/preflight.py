"""Checks that need more than the recipe schema, run before anything is written."""

from __future__ import annotations

from pathlib import Path

from amp_deploy.errors import UserError
from amp_deploy.recipe import Recipe


def prepare_out(out: Path) -> None:
    """Create the output folder; a UserError when it cannot be one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None


def preflight(recipe: Recipe, device: str | None = None) -> None:
    """Cheap checks that need more than the recipe schema, run before anything is written.

    `device`: the build's device type (cpu, cuda); None: cuda when a GPU is present."""
    m = recipe.model
    if m.source == "timm":
        import timm

        if not timm.is_model(m.name):
            from amp_deploy.prune.families import unknown_model_error

            raise unknown_model_error(m.name, timm.list_models(), "timm")
    elif m.source == "checkpoint":
        from amp_deploy.checkpoint import read_metadata

        read_metadata(m.pretrained)
    if isinstance(m.pretrained, str) and m.pretrained.endswith(".safetensors") and m.source != "checkpoint":
        from amp_deploy.prune.families import safetensors_metadata

        safetensors_metadata(m.pretrained)
    d = recipe.data
    if d.source == "digits":
        from amp_deploy.data import DIGITS_TEST, DIGITS_TOTAL

        if d.holdout > DIGITS_TEST:
            raise UserError(f"data.holdout: the digits test split has {DIGITS_TEST} images, the recipe asks for {d.holdout}")
        if d.calibration + d.validation > DIGITS_TOTAL - DIGITS_TEST:
            raise UserError(f"data: the digits training split has {DIGITS_TOTAL - DIGITS_TEST} images, the recipe asks for "
                            f"{d.calibration + d.validation} (data.calibration + data.validation)")
    if d.source == "folder":
        from amp_deploy.data import folder_layout

        files, _, classes = folder_layout(Path(d.path))
        _classes_fit(recipe, classes)
        have, want = len(files), d.calibration + d.validation + d.holdout
        if have < want:
            raise UserError(f"data.path: {d.path} has {have} image files but the recipe asks for {want} "
                            "(data.calibration + validation + holdout)")
    _distill_preflight(recipe)
    _openvino_preflight(recipe)
    _quantize_preflight(recipe)
    _latency_preflight(recipe, device)


def _latency_preflight(recipe: Recipe, device: str | None) -> None:
    """A latency budget is measured on its runtime: refuse one that cannot run here."""
    p = recipe.prune
    if p.target_speedup is None and p.target_latency_ms is None:
        return
    import torch

    from amp_deploy.pipeline.speedup import unavailable_reason

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if reason := unavailable_reason(p.latency, device):
        raise UserError(f"prune.latency.runtime {p.latency.runtime}: cannot be measured here: {reason}")


def _openvino_preflight(recipe: Recipe) -> None:
    """OpenVINO (and NNCF for its INT8) installed; bf16 only on a CPU with bf16 units. (A latency
    budget on OpenVINO needs the same row in the recipe, so it is checked here too.)"""
    from amp_deploy.deploy.runtimes import OPENVINO_RUNTIMES
    from amp_deploy.pipeline.context import runs_openvino

    if not runs_openvino(recipe):
        return
    from amp_deploy.deploy.openvino import bf16_problem, openvino_problem

    int8 = "openvino-int8" in recipe.quantize.formats
    asked = [r for r in recipe.runtimes if r in OPENVINO_RUNTIMES] + (["openvino-int8"] if int8 else [])
    if problem := openvino_problem(int8):
        raise UserError(f"runtimes {asked}: {problem}")
    if "openvino-bf16" in recipe.runtimes:
        if problem := bf16_problem():
            raise UserError(f"openvino bf16: {problem}; use runtimes openvino (fp32) or openvino-int8")


def _quantize_preflight(recipe: Recipe) -> None:
    """Model Optimizer present with the API the TensorRT formats need; FP8 only on a GPU that has it."""
    from amp_deploy.deploy.quantize import modelopt_problem, runtime_of
    from amp_deploy.pipeline.stages import fp8_capable

    q = recipe.quantize
    if "onnxruntime-int8" in q.formats:
        from amp_deploy.deploy.quantize import ort_quantizable_ops

        known = ort_quantizable_ops()
        if bad := [t for t in q.op_types if t not in known]:
            raise UserError(f"quantize.op_types: {', '.join(map(repr, bad))} is not an operator type ONNX Runtime's "
                            f"quantizer knows (it knows {', '.join(sorted(known))})")
    trt = [f for f in q.formats if runtime_of(f) == "tensorrt"]
    if trt and (problem := modelopt_problem()):
        raise UserError(f"quantize.formats {trt}: {problem}")
    for fmt in trt:
        fp8_capable(fmt)


def _classes_fit(recipe: Recipe, classes: list[str] | None) -> None:
    """A classifier's accuracy needs the folder's classes to be the model's: refuse a count that differs."""
    m = recipe.model
    if classes is None or m.source != "timm":
        return
    import timm

    cfg = timm.models.get_pretrained_cfg(m.name)
    n = m.kwargs.get("num_classes", getattr(cfg, "num_classes", None) if cfg is not None else None)
    if n and n != len(classes):
        raise UserError(f"data.path: {len(classes)} class folders but the model has {n} classes; top-1 needs them to "
                        "match (class index = position in the sorted folder names), or use a flat folder")


def _distill_preflight(recipe: Recipe) -> None:
    """Distillation must have images left once the holdout and validation images are set aside."""
    d, data = recipe.distill, recipe.data
    if d.epochs == 0 or not d.path:
        return
    from amp_deploy.data import folder_order, image_files

    files = {f.resolve() for f in image_files(Path(d.path), key="distill.path")}
    if data.source == "folder":
        # the files the data loader will set aside (all readable assumed; the stage re-checks)
        order = folder_order(Path(data.path), data.seed)[0]
        files -= {f.resolve() for f in order[data.calibration:data.calibration + data.validation + data.holdout]}
    if not files:
        raise UserError(f"distill.path: {d.path} has no image left to train on once the holdout and validation "
                        "images are excluded; give it a folder of other images")
