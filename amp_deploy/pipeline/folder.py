"""The output folder of a build: every file name and format, named once.

Stages read and write through a `BuildFolder`, never through string literals of their own, so a
file's name, its format and its atomic write live in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from amp_deploy.deploy.openvino import ir_files
from amp_deploy.errors import first_line
from amp_deploy.files import atomic_path, write_json, write_text

Which = str  # "original" | "pruned"


@dataclass(frozen=True)
class BuildFolder:
    """Paths and typed readers/writers of the files in one output folder."""

    root: Path
    distilled: bool = False  # the recipe distils: the rebuilt model waits under another name
    openvino: bool = False  # the recipe runs OpenVINO: the export stage writes IR beside the ONNX files

    # --- paths ---------------------------------------------------------------------------------
    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def scores(self) -> Path:
        return self.root / "scores.safetensors"

    @property
    def search(self) -> Path:
        return self.root / "search.json"

    @property
    def pruned(self) -> Path:
        return self.root / "pruned.safetensors"

    @property
    def rebuilt(self) -> Path:
        """The pruned model as the rebuild stage leaves it: pruned.safetensors itself, unless
        distillation follows and writes that file."""
        return self.root / "pruned.before_distill.safetensors" if self.distilled else self.pruned

    @property
    def compensate_log(self) -> Path:
        """What the rebuild's re-fit did (prune.compensate): per block and site, errors and declines."""
        return self.root / "compensate.json"

    @property
    def distill_checkpoint(self) -> Path:
        return self.root / "distill.ckpt.safetensors"

    @property
    def distill_checkpoint_sharded(self) -> Path:
        """A sharded distillation's epoch checkpoint (a torch.distributed.checkpoint folder)."""
        return self.root / "distill.ckpt.dcp"

    @property
    def distill_log(self) -> Path:
        return self.root / "distill.json"

    @property
    def compile_status(self) -> Path:
        return self.root / "compile.json"

    @property
    def ort_trt_cache(self) -> Path:
        return self.root / "ort_trt_cache"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def onnx(self, which: Which, precision: str = "fp32") -> Path:
        """The fp32 export (`pruned.onnx`), or the half-precision one TensorRT builds from."""
        return self.root / (f"{which}.onnx" if precision == "fp32" else f"{which}.{precision}.onnx")

    def quantized(self, which: Which, fmt: str) -> Path:
        """A quantized model: `pruned.onnxruntime-int8.onnx`, `original.tensorrt-fp8.onnx`, ...
        (OpenVINO's INT8: the IR `pruned.openvino-int8.xml` and its `.bin`)."""
        return self.root / (f"{which}.{fmt}.xml" if fmt.startswith("openvino-") else f"{which}.{fmt}.onnx")

    def ir(self, which: Which) -> Path:
        """The OpenVINO IR of the fp32 export: `pruned.xml` (and `pruned.bin`)."""
        return self.root / f"{which}.xml"

    def ir_files(self) -> list[Path]:
        """Both models' IR files (graph and weights), when the recipe runs OpenVINO."""
        return [p for w in ("original", "pruned") for p in ir_files(self.ir(w))] if self.openvino else []

    @property
    def quantize_log(self) -> Path:
        return self.root / "quantize.json"

    def quantized_files(self, formats: list[str]) -> list[Path]:
        files = [self.quantized(w, f) for f in formats for w in ("original", "pruned")]
        return [q for p in files for q in (ir_files(p) if p.suffix == ".xml" else (p,))]

    def plan(self, which: Which, fmt: str | None = None) -> Path:
        """The engine of `which` (fp16/bf16/fp32 from the export), or of a TensorRT Q/DQ format."""
        return self.root / (f"{which}.plan" if fmt is None else f"{which}.{fmt}.plan")

    def plan_sidecar(self, which: Which) -> Path:
        return _sidecar(self.plan(which))

    # --- scores ----------------------------------------------------------------------------------
    def write_scores(self, sums: dict[str, list[torch.Tensor]], meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tensors = {f"{k}.{i}": t.contiguous() for k, v in sums.items() for i, t in enumerate(v)}
        with atomic_path(self.scores) as tmp:
            save_file(tensors, str(tmp), metadata={**meta, "blocks": str(len(sums["abs"]))})

    def read_scores(self, kind: str = "abs") -> list[torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.scores), framework="pt") as f:
            return [f.get_tensor(f"{kind}.{i}") for i in range(int(f.metadata()["blocks"]))]

    def read_head_scores(self, kind: str = "abs") -> list[torch.Tensor] | None:
        """Each block's head scores, or None where the scores have none (an attention of no known kind,
        or a scores file from before heads were scored)."""
        from safetensors import safe_open

        with safe_open(str(self.scores), framework="pt") as f:
            if f"heads.{kind}.0" not in f.keys():
                return None
            return [f.get_tensor(f"heads.{kind}.{i}") for i in range(int(f.metadata()["blocks"]))]

    def scores_meta(self) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(self.scores), framework="pt") as f:
            return f.metadata() or {}

    # --- distillation checkpoint ---------------------------------------------------------------------
    def write_distill_checkpoint(self, state, fingerprint: str) -> None:
        """Student weights, optimizer state and progress, written atomically after every epoch."""
        from safetensors.torch import save_file

        tensors = {f"student.{k}": v.detach().contiguous().cpu() for k, v in state.student.items()}
        opt = state.optimizer
        for idx, st in opt["state"].items():
            tensors.update({f"opt.{idx}.{k}": torch.as_tensor(v).contiguous().cpu() for k, v in st.items()})
        meta = {"fingerprint": fingerprint, "epoch": str(state.epoch), "losses": json.dumps(state.losses),
                "param_groups": json.dumps(opt["param_groups"]), "probe": json.dumps(state.probe)}
        with atomic_path(self.distill_checkpoint) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def read_distill_checkpoint(self, fingerprint: str, say=lambda message: None):
        """The saved state, or None when there is none or it belongs to other settings or weights
        (then `say` is told why the distillation starts over)."""
        from safetensors import SafetensorError, safe_open

        from amp_deploy.prune.distill import DistillState

        if not self.distill_checkpoint.is_file():
            return None
        try:
            with safe_open(str(self.distill_checkpoint), framework="pt") as f:
                meta = f.metadata()
                if meta.get("fingerprint") != fingerprint:
                    say(f"distill: {self.distill_checkpoint.name} was saved with other settings or weights; "
                        "starting over")
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            say(f"distill: {self.distill_checkpoint.name} is unreadable ({first_line(e, 80)}); starting over")
            return None
        student = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        optimizer = {"state": state, "param_groups": json.loads(meta["param_groups"])}
        return DistillState(student, optimizer, int(meta["epoch"]), json.loads(meta["losses"]),
                            json.loads(meta.get("probe") or "null"))

    # --- JSON documents --------------------------------------------------------------------------
    def write_distill_log(self, log: dict[str, Any]) -> None:
        write_json(self.distill_log, log)

    def read_distill_log(self) -> dict[str, Any] | None:
        return json.loads(self.distill_log.read_text()) if self.distill_log.is_file() else None

    def write_compensate_log(self, log: dict[str, Any]) -> None:
        write_json(self.compensate_log, log)

    def read_compensate_log(self) -> dict[str, Any] | None:
        return json.loads(self.compensate_log.read_text()) if self.compensate_log.is_file() else None

    def write_search(self, result: dict[str, Any]) -> None:
        write_json(self.search, result)

    def read_search(self) -> dict[str, Any]:
        return json.loads(self.search.read_text())

    def write_quantize_log(self, log: dict[str, Any]) -> None:
        write_json(self.quantize_log, log)

    def read_quantize_log(self) -> dict[str, Any]:
        return json.loads(self.quantize_log.read_text()) if self.quantize_log.is_file() else {}

    def write_compile_status(self, status: dict[str, Any]) -> None:
        write_json(self.compile_status, status)

    def read_compile_status(self) -> dict[str, Any]:
        return json.loads(self.compile_status.read_text())

    def engine_files(self) -> list[Path]:
        """Plans and sidecars that the compile stage recorded as built (none when it skipped)."""
        if not self.compile_status.is_file():
            return []
        status = self.read_compile_status()
        plans = [self.plan(which) for which in status.get("engines") or {}]
        plans += [self.plan(which, fmt) for fmt, engines in (status.get("quantized") or {}).items() for which in engines]
        return [p for plan in plans for p in (plan, _sidecar(plan))]

    def write_report(self, report: dict[str, Any]) -> None:
        """report.json, report.md and the plots they link to."""
        from amp_deploy.measure.plots import write_plots
        from amp_deploy.measure.report import render_md

        report["plots"] = [f"{self.plots.name}/{p}" for p in write_plots(report, self.plots)]
        write_json(self.report_json, report)
        write_text(self.report_md, render_md(report))

    def stage_seconds(self, stage: str) -> float:
        """How long a finished stage took, from manifest.json."""
        return float(json.loads(self.manifest.read_text())["stages"][stage]["seconds"])

    def write_recipe(self, text: str) -> None:
        write_text(self.recipe, text)

    def read_recipe_doc(self) -> dict[str, Any]:
        """The saved (resolved) recipe as a mapping; empty when the folder has none."""
        from amp_deploy.recipe import read_yaml

        return read_yaml(self.recipe) if self.recipe.is_file() else {}


def _sidecar(plan: Path) -> Path:
    from amp_deploy.deploy.tensorrt_engine import sidecar_path

    return sidecar_path(plan)
