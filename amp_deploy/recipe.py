"""The recipe: a strict YAML document parsed into typed objects.

Only this module knows YAML. Every problem is collected and reported at once with its dotted
path; an unknown key is an error, and so is a wrong type (no silent coercion of "0.1" to 0.1).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from amp_deploy.checkpoint import ModelSource
from amp_deploy.data import DataSource
from amp_deploy.deploy.export import Exporter, Precision
from amp_deploy.deploy.quantize import DEFAULT_ORT_OPS, CalibrationMethod, Format, runtime_of
from amp_deploy.deploy.runtimes import RuntimeName
from amp_deploy.errors import UserError
from amp_deploy.files import SAFE_NAME
from amp_deploy.prune.distill import LR_CANDIDATES
from amp_deploy.prune.score import Criterion, SearchLoss, Taylor

NAME_PATTERN = SAFE_NAME  # a recipe name: names out/NAME and Triton entries


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _f(default: Any = ..., description: str = "", *, factory: Any = None, **kw) -> Any:
    """A field with its documentation (`amp-deploy check --keys` lists it)."""
    if factory is not None:
        return Field(default_factory=factory, description=description, **kw)
    return Field(default, description=description, **kw)


class MlpSitesSpec(_Strict):
    """Where the MLPs are in a model family amp-deploy does not know (module paths)."""

    blocks: str = _f(description="the block list, from the model, e.g. encoder.layers")
    fc_in: str = _f(description="inside a block: the d -> h Linear (d -> 2h when packed), e.g. mlp.fc1")
    fc_out: str = _f(description="inside a block: the h -> d Linear, e.g. mlp.fc2")
    packed: bool = _f(False, "fc_in holds value and gate halves")
    gate: str | None = _f(None, "a separate gate Linear (d -> h)")
    norm: str | None = _f(None, "a LayerNorm over the h hidden neurons")


class ModelSpec(_Strict):
    source: ModelSource = _f("timm", "timm | open_clip | transformers (optional extra) | checkpoint (a "
                                     "pruned.safetensors of ours)")
    name: str | None = _f(None, "the factory's model name (timm.list_models(), open_clip.list_models())")
    pretrained: bool | str = _f(False, "true (hub weights), false (seeded random init), a local weights file, or "
                                           "(transformers) a checkpoint folder")
    kwargs: dict[str, Any] = _f(description="passed to the factory (depth, img_size, num_classes, ...); open_clip: "
                                      "pretrained names the weights tag", factory=dict)
    mlp_sites: MlpSitesSpec | None = _f(None, "where the MLPs are, for a model family not found automatically")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.source != "checkpoint" and not self.name:
            raise ValueError(f"model.name is required for source {self.source!r}")
        if self.source == "checkpoint" and not isinstance(self.pretrained, str):
            raise ValueError("source 'checkpoint' needs model.pretrained: the path of a pruned.safetensors")
        if isinstance(self.pretrained, str):
            path = Path(self.pretrained)
            if path.is_dir() and self.source != "transformers":
                raise ValueError(f"model.pretrained: {path} is a folder; {self.source} takes a weights file "
                                 "(a folder is a transformers checkpoint: model.source transformers)")
            if not path.exists():
                raise ValueError(f"model.pretrained: weights file not found: {self.pretrained}")
        return self


class DataSpec(_Strict):
    source: DataSource = _f("digits", "digits (bundled real images) | folder (image files) | synthetic")
    path: str | None = _f(None, "the image folder, with data.source: folder")
    calibration: int = _f(512, "images for the importance scores", ge=1)
    validation: int = _f(256, "images for the width search", ge=1)
    holdout: int = _f(256, "images for fidelity and accuracy in the report (never used to prune)", ge=1)
    batch_size: int = _f(64, "batch size for scoring, the search and references", ge=1)
    workers: int | None = _f(None, "DataLoader worker processes reading calibration images (default: one per "
                                   "spare core, at most 8; 0 reads in the main process)", ge=0)
    seed: int = _f(0, "seeds the split, synthetic images and a random-init model")
    class_names: str | None = _f(None, "a text file of readable class names, one per line in the sorted class "
                                       "folder order, for zero-shot and the image-text view (default: the folder "
                                       "names; ImageNet WordNet ids are looked up)")

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.source == "folder":
            if not self.path:
                raise ValueError("data.path is required when data.source is 'folder'")
            if not Path(self.path).is_dir():
                raise ValueError(f"data.path: not a directory: {self.path}")
        cores = os.cpu_count() or 1
        if self.workers is not None and self.workers > cores:
            raise ValueError(f"data.workers: {self.workers} is more than this machine's {cores} cores")
        if self.class_names is not None and not Path(self.class_names).is_file():
            raise ValueError(f"data.class_names: file not found: {self.class_names}")
        return self


LatencyRuntime = Literal["onnxruntime", "onnxruntime-cuda", "torch", "tensorrt", "openvino"]
LATENCY_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "onnxruntime-cuda": ("fp32",), "torch": ("fp32", "fp16", "bf16"),
                      "tensorrt": ("fp32", "fp16"), "openvino": ("fp32", "bf16", "int8")}


class LatencySpec(_Strict):
    """Where prune.target_speedup / target_latency_ms is measured, and how finely."""

    runtime: LatencyRuntime = _f("onnxruntime", "the runtime the speedup is asked on: " + " | ".join(LatencyRuntime.__args__)
                                 + " (it must be in runtimes, so validate measures it too)")
    batch: int = _f(8, "the batch size the speedup is asked at (inside export.batch)", ge=1)
    precision: Literal["fp32", "fp16", "bf16", "int8"] = _f(
        "fp32", "the precision the speedup is asked in: onnxruntime fp32 | int8 (ONNX Runtime static INT8, as "
                "quantize.formats onnxruntime-int8), onnxruntime-cuda fp32, torch fp32 | fp16 | bf16, tensorrt fp32 | fp16, "
                "openvino fp32 | bf16 | int8 (NNCF, as quantize.formats openvino-int8)")
    baseline: Literal["same", "fp32"] = _f(
        "same", "what the speedup is over: same (the original in the budget's runtime and precision) | fp32 (the "
                "original in fp32 on the same runtime: what an int8, bf16 or fp16 build replaces; docs/latency-budget.md)")
    widths: int = _f(12, "candidate widths per block (evenly spaced up to the full width, on the prune.align grid); "
                         "the latency table and the loss curves are measured at these", ge=2, le=64)
    iterations: int = _f(30, "timed rounds for the latency table (every candidate interleaved with the full model); "
                             "twice as many for each end-to-end check", ge=5)
    warmup: int = _f(5, "warm-up rounds before timing", ge=0)
    tolerance: float = _f(0.03, "the measured speedup may differ from the target by this fraction; beyond, the "
                                "budget is corrected and the widths chosen again", gt=0, lt=1)
    corrections: int = _f(5, "at most this many corrections after the first end-to-end check (each check costs one "
                             "model prepared and 2 x iterations rounds; the checks stop once one lands within the "
                             "tolerance)", ge=0, le=10)


class PruneSpec(_Strict):
    criterion: Criterion = _f("entropy", "entropy (label-free) | ce (labels) | magnitude | random")
    search: Literal["adaptive", "uniform"] = _f("adaptive", "adaptive (per-block binary search) | uniform")
    threshold: float = _f(0.01, "adaptive: the search loss (nats) each block may add over the last accepted "
                                "loss; divergence: nats of KL from the original model; cosine: cosine distance to its output", ge=0)
    keep_ratio: float | None = _f(None, "uniform: fraction of hidden neurons kept", gt=0, le=1)
    target_params: float | None = _f(None, "adaptive: a parameter budget as a fraction of the original "
                                           "(an outer search over the threshold)", gt=0, le=1)
    target_speedup: float | None = _f(None, "adaptive: the latency budget as a speedup over the original on "
                                            "prune.latency's runtime, batch and precision (widths chosen by a "
                                            "knapsack over measured latency and loss curves)", gt=1)
    target_latency_ms: float | None = _f(None, "adaptive: the latency budget in milliseconds per batch of "
                                               "prune.latency.batch on its runtime and precision", gt=0)
    latency: LatencySpec = _f(description="where a latency budget is measured", factory=LatencySpec)
    taylor: Taylor = _f("abs", "abs: per image |sum over tokens of a*g|, averaged (the reference code's); "
                               "token: per token |a*g|, averaged; signed: the signed token sum")
    temperature: float | None = _f(None, "inverse temperature T of the loss's softmax (over T * similarities, or "
                                         "T * logits); default 15 for image-image and image-text (the reference's "
                                         "CLIP value; its DINOv2 configs use 20), 1 for predictions", gt=0)
    loss_view: Literal["auto", "predictions", "image-image", "image-text"] = _f(
        "auto", "what the entropy is taken over: predictions (softmax of the logits) | image-image (the batch's "
                "feature similarities) | image-text (open_clip with class folders); auto: predictions for a classifier "
                "head, image-image otherwise")
    search_loss: SearchLoss = _f(
        "divergence", "what the width search holds each block to: divergence (KL of the original's distribution to the "
                      "pruned model's, in the loss view) | cosine (1 - cosine of the output to the original's) | "
                      "entropy (the level, as the reference code); the ce criterion searches with ce (docs/recipes.md)")
    uniform_check: bool = _f(True, "with target_params: also score the same fraction of neurons in every block at the "
                                   "budget and keep it when it departs less from the original (docs/recipes.md)")
    heads: bool = _f(False, "also cut attention heads (a gate per head, scored in the same pass; its count bisected "
                            "after each block's width, or chosen by the latency budget's knapsack); false: the MLPs "
                            "alone, as the authors' AMP (docs/heads.md)")
    compensate: Literal["ridge", "bias", "none"] = _f(
        "ridge", "re-fit the layer that reads the cut units to the unpruned layer's output on the calibration images: "
                 "ridge (weights and bias, least squares) | bias (the removed units' mean into the bias) | none (the "
                 "authors' AMP); the search prices every candidate with it (docs/compensation.md)")
    compensate_damping: float = _f(0.01, "ridge damping as a fraction of the mean of the Gram matrix's diagonal "
                                         "(no unit: the same for every model)", gt=0)
    compensate_tokens: int = _f(64, "tokens per image (a seeded sample) in the re-fit's statistics", ge=1)
    steps: int = _f(6, "bisection steps per block", ge=1, le=20)
    align: int = _f(1, "kept widths are multiples of this (e.g. 64 for tensor cores)", ge=1)
    cache: bool = _f(True, "replay the hidden states entering each block during the search (false: the "
                           "reference scheme, the whole model every step)")
    checkpointing: bool = _f(False, "recompute block activations while scoring, so giant models fit; same scores")

    @model_validator(mode="after")
    def _check(self) -> PruneSpec:
        if self.search == "uniform" and self.keep_ratio is None:
            raise ValueError("prune.keep_ratio is required when prune.search is 'uniform'")
        if self.loss_view != "auto" and self.criterion == "ce":
            raise ValueError(f"prune.loss_view: {self.loss_view} is a view of the label-free loss; the ce criterion "
                             "uses the labels")
        if self.search == "uniform" and self.target_params is not None:
            raise ValueError("prune.target_params works with prune.search 'adaptive' (it searches the threshold)")
        budgets = [k for k in ("target_params", "target_speedup", "target_latency_ms") if getattr(self, k) is not None]
        if len(budgets) > 1:
            raise ValueError(f"prune: {' and '.join(budgets)} are both set; give one budget")
        if self.search == "uniform" and budgets:
            raise ValueError(f"prune.{budgets[0]} works with prune.search 'adaptive'")
        if self.heads and self.search == "uniform":
            raise ValueError("prune.heads works with prune.search 'adaptive' (the head count is searched per block)")
        lat = self.latency
        if lat.precision not in LATENCY_PRECISIONS[lat.runtime]:
            raise ValueError(f"prune.latency.precision: {lat.runtime} runs {' | '.join(LATENCY_PRECISIONS[lat.runtime])}, "
                             f"not {lat.precision}")
        return self


class DistillSpec(_Strict):
    """Recovery after pruning: the pruned model learns to reproduce the original on unlabeled images."""

    epochs: int = _f(0, "passes over the distillation images; 0 turns distillation off", ge=0)
    lr: float | Literal["auto"] = _f("auto", "peak learning rate of AdamW (warm-up, then cosine decay); auto: each of "
                                            "distill.lr_candidates trains a copy for distill.probe of the run and the "
                                            "lowest validation loss wins (docs/distillation.md)")
    lr_candidates: list[float] = _f(description="distill.lr auto: the peak rates probed",
                                    factory=lambda: list(LR_CANDIDATES), min_length=1)
    probe: float = _f(0.25, "distill.lr auto: each candidate's probe, as a fraction of the run's steps (at least 8 "
                            "steps, at most the run)", gt=0, le=1)
    batch_size: int = _f(64, "global batch, split across --nproc processes", ge=1)
    warmup: float = _f(1.0, "epochs of linear learning-rate warm-up (at most half of all steps, so that a short "
                            "run decays too)", ge=0)
    weight_decay: float = _f(0.05, "AdamW's decoupled weight decay", ge=0)
    loss: Literal["auto", "tokens", "output", "kl", "cosine", "mse"] = _f(
        "auto", "tokens: the output loss (kl on logits, cosine on an embedding) plus every token of the last block "
                "before the final norm | output: the output loss alone | kl, cosine, mse on the output; auto: tokens "
                "(docs/distillation.md)")
    temperature: float = _f(1.0, "softens teacher and student logits for the kl loss", gt=0)
    augment: bool = _f(True, "augmentation that fits the data: one-pixel shifts for digits, horizontal "
                             "flips for image folders, none for synthetic images")
    path: str | None = _f(None, "a folder of images to distil on (default: the training split for digits, "
                                "the calibration images otherwise); holdout and validation files are excluded")
    images: int | None = _f(None, "at most this many images of distill.path, a seeded sample (default: all)", ge=1)
    sharding: Literal["auto", "none", "fsdp"] = _f("auto", "none: every process holds the whole student, its AdamW "
                                                           "state and the teacher; fsdp: FSDP2, each transformer "
                                                           "block its own unit, so a process holds 1/N of them "
                                                           "(--nproc N); auto: fsdp when several processes run and "
                                                           "the unsharded plan does not fit one device's memory")
    checkpointing: bool = _f(False, "activation checkpointing: each block's activations are recomputed in the "
                                    "backward pass instead of kept (less memory, about a third more compute)")
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "bf16: forward and backward in bfloat16 (sharded: bf16 "
                                                            "parameters and gradient reductions), master weights and "
                                                            "AdamW state in fp32; fp32: everything in float32; auto: "
                                                            "bf16 on CUDA, fp32 on the CPU")

    @model_validator(mode="after")
    def _check(self) -> DistillSpec:
        if self.path is not None and not Path(self.path).is_dir():
            raise ValueError(f"distill.path: not a directory: {self.path}")
        if isinstance(self.lr, float) and not self.lr > 0:
            raise ValueError(f"distill.lr: {self.lr:g} must be above 0 (or auto)")
        if any(not r > 0 for r in self.lr_candidates):
            raise ValueError(f"distill.lr_candidates: {self.lr_candidates} must all be above 0")
        if self.images is not None and self.path is None:
            raise ValueError("distill.images samples distill.path's folder; set distill.path too (without it the "
                             "calibration images are used, all of them)")
        return self


class BatchRange(_Strict):
    min: int = _f(1, "smallest batch the exported models and engines accept", ge=1)
    opt: int = _f(8, "the batch TensorRT tunes for", ge=1)
    max: int = _f(32, "largest batch", ge=1)

    @model_validator(mode="after")
    def _check(self) -> BatchRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"export.batch needs min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class ExportSpec(_Strict):
    opset: int = _f(18, "ONNX opset (>= 17: LayerNorm is one LayerNormalization node)", ge=17, le=23)
    exporter: Exporter = _f("dynamo", "torch.onnx exporter: dynamo | torchscript")
    batch: BatchRange = _f(description="the dynamic batch axis (and the TensorRT optimization profile)", factory=BatchRange)


class CompileSpec(_Strict):
    """TensorRT engine builds (and the precision of ONNX Runtime's TensorRT provider)."""

    precision: Precision = _f("fp16", "engine precision: fp16 | bf16 | fp32")
    strongly_typed: bool = _f(True, "precision from the graph (false: fp32 ONNX plus FP16/BF16 builder flags, "
                                    "TensorRT 10.x only)")
    workspace_mib: int = _f(4096, "TensorRT builder workspace", ge=16)
    optimization_level: int = _f(3, "TensorRT builder optimization level", ge=0, le=5)
    timing_cache: bool = _f(True, "keep a timing cache in OUT (one per TensorRT version and GPU generation) for later builds")


class ParityGate(_Strict):
    max_abs_err: float = _f(1e-4, "largest absolute difference from the torch model", gt=0)
    cosine_min: float = _f(0.99999, "smallest per-image cosine with the torch model", ge=-1, le=1)


def _reduced_gate() -> ParityGate:
    return ParityGate(max_abs_err=5e-2, cosine_min=0.999)


class Bf16Gate(_Strict):
    """bf16 keeps 8 bits of mantissa: its error grows with the output's scale and with depth, so it is
    judged by cosines (on DINOv2 ViT-S/14, OpenVINO bf16: mean 0.9998, min 0.998 over 1,000 images)."""

    cosine_mean: float = _f(0.999, "at least this mean per-image cosine with the torch model", ge=-1, le=1)
    cosine_min: float = _f(0.99, "smallest per-image cosine with the torch model", ge=-1, le=1)
    max_abs_err: float | None = _f(None, "optional: largest absolute difference from the torch model", gt=0)


class FidelityGate(_Strict):
    """Optional limits on the price of pruning (pruned vs original on the holdout images)."""

    cosine_mean: float | None = _f(None, "at least this mean cosine", ge=-1, le=1)
    top1_agreement: float | None = _f(None, "at least this top-1 agreement (0..1)", ge=0, le=1)
    accuracy_drop: float | None = _f(None, "at most this accuracy drop, in points", ge=0)


class QuantGate(_Strict):
    """Parity of a quantized model with the fp32 model it was quantized from (holdout images)."""

    cosine_mean: float = _f(0.99, "at least this mean per-image cosine with the fp32 model", ge=-1, le=1)
    cosine_min: float = _f(0.9, "at least this per-image cosine for every image", ge=-1, le=1)
    max_abs_err: float | None = _f(None, "optional: at most this absolute difference (scale depends on the model)", gt=0)


class ValidateSpec(_Strict):
    batch_sizes: list[int] = _f(description="timed batch sizes (inside export.batch)", factory=lambda: [1, 8], min_length=1)
    warmup: int = _f(10, "warm-up rounds before timing", ge=0)
    warmup_seconds: float = _f(0.0, "warm up for at least this long as well", ge=0)
    iterations: int = _f(50, "timed rounds (original and pruned interleaved)", ge=1)
    may_fail: list[str] = _f(description="report rows (runtimes, quantized formats) whose failure to load or run is "
                                         "reported without failing the build; any other requested row that fails "
                                         "fails it (exit 1, its files and the runtime's reason named)",
                             factory=list)
    threads: int | None = _f(None, "CPU threads for the runtimes (default: theirs)", ge=1)
    parity: ParityGate = _f(description="parity limits for fp32 runtimes (breach: exit 1)", factory=ParityGate)
    parity_reduced: ParityGate = _f(description="parity limits for fp16/tf32 runtimes (breach: exit 1)", factory=_reduced_gate)
    parity_bf16: Bf16Gate = _f(description="parity limits for bf16 runtimes (openvino-bf16, torch/tensorrt bf16; "
                                           "breach: exit 1)", factory=Bf16Gate)
    fidelity: FidelityGate = _f(description="optional limits on pruned vs original (breach: exit 1)", factory=FidelityGate)
    parity_int8: QuantGate = _f(description="INT8 rows (quantize.formats) vs their fp32 model (breach: exit 1)",
                                factory=QuantGate)
    parity_fp8: QuantGate = _f(description="FP8 rows (quantize.formats) vs their fp32 model (breach: exit 1)",
                               factory=QuantGate)


class QuantizeSpec(_Strict):
    """Post-training quantization of the exported models, calibrated on the calibration images."""

    formats: list[Format] = _f(description="what to make: onnxruntime-int8 (ONNX Runtime static QDQ) | tensorrt-int8 "
                                           "| tensorrt-fp8 (NVIDIA Model Optimizer Q/DQ, compiled strongly typed) "
                                           "| openvino-int8 (NNCF post-training INT8, OpenVINO IR); "
                                           "empty: no quantization", factory=list)
    calibration: int = _f(256, "images calibrated on: the first of data.calibration (never holdout or validation)",
                          ge=1)
    method: CalibrationMethod = _f("percentile", "onnxruntime-int8 activation ranges: percentile (99.999th, "
                                                 "the default: measured best on DINOv2 ViT-S/14) | minmax | entropy")
    per_channel: bool = _f(True, "onnxruntime-int8: one weight scale per output channel")
    activations: Literal["uint8", "int8"] = _f("uint8", "onnxruntime-int8 activation type (uint8: the fast "
                                                         "u8s8 kernels on x86)")
    op_types: list[str] = _f(description="onnxruntime-int8: operator types quantized; the rest stays float",
                             factory=lambda: list(DEFAULT_ORT_OPS), min_length=1)
    preprocess: bool = _f(True, "onnxruntime-int8: ONNX Runtime's quant_pre_process first (graph optimisations)")
    openvino_model_type: Literal["transformer", "default"] = _f(
        "transformer", "openvino-int8: NNCF's model type (transformer: SmoothQuant, LayerNorm/Softmax/GELU kept "
                       "in float; default: NNCF's generic placement)")


class MachineSpec(_Strict):
    """The machine a recipe is written for: `amp-deploy check` plans each stage's memory for it (a build
    plans for the machine it runs on, with its --device and --nproc)."""

    device: Literal["cpu", "cuda"] = _f("cuda", "the device type of the stages that use one")
    processes: int = _f(1, "processes, one per GPU (amp-deploy build --nproc)", ge=1)
    memory_gib: float = _f(description="memory of one device in GiB (a GPU's; the host's for cpu)", gt=0)


class Recipe(_Strict):
    """A whole recipe: what to prune, on which images, how, and how to ship and validate it."""

    name: str = _f(description="names the default output folder out/NAME", pattern=f"^{NAME_PATTERN}$", max_length=100)
    model: ModelSpec = _f(description="the model to prune")
    data: DataSpec = _f(description="calibration, validation and holdout images", factory=DataSpec)
    prune: PruneSpec = _f(description="how AMP scores and searches", factory=PruneSpec)
    distill: DistillSpec = _f(description="recovery by distillation from the original (off by default)",
                              factory=DistillSpec)
    export: ExportSpec = _f(description="ONNX export", factory=ExportSpec)
    quantize: QuantizeSpec = _f(description="INT8/FP8 post-training quantization (off by default)",
                                factory=QuantizeSpec)
    compile: CompileSpec = _f(description="TensorRT engines", factory=CompileSpec)
    runtimes: list[RuntimeName] = _f(description="runtimes to validate: " + " | ".join(RuntimeName.__args__),
                                     factory=lambda: ["onnxruntime", "tensorrt"])
    validate_: ValidateSpec = _f(description="latency, parity and fidelity measurement", factory=ValidateSpec, alias="validate")
    machine: MachineSpec | None = _f(None, "the machine the recipe is planned for (amp-deploy check prints each "
                                          "stage's memory for it); none: this machine")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        b = self.export.batch
        outside = [n for n in self.validate_.batch_sizes if not b.min <= n <= b.max]
        if outside:
            raise ValueError(f"validate.batch_sizes {outside} are outside export.batch [{b.min}, {b.max}]: "
                             "engines and exported models accept only that range")
        if self.prune.loss_view == "image-text" and (self.model.source != "open_clip" or self.data.source != "folder"):
            raise ValueError("prune.loss_view: image-text needs an open_clip model (its text tower) and a class "
                             "folder (data.source: folder with one subfolder per class) for the prompts")
        if self.distill.path is not None and self.data.source != "folder":
            raise ValueError(f"distill.path works with data.source folder; with {self.data.source} the "
                             "distillation images are the data source's own (remove distill.path)")
        if self.compile.precision == "bf16" and self.export.opset < 22:
            raise ValueError(f"compile.precision bf16 needs export.opset >= 22 (ONNX allows bfloat16 Conv from "
                             f"opset 22), got {self.export.opset}")
        self._check_quantize()
        self._check_latency()
        return self

    def _check_latency(self) -> None:
        p, b = self.prune, self.export.batch
        if p.target_speedup is None and p.target_latency_ms is None:
            return
        lat = p.latency
        row = "openvino-bf16" if (lat.runtime, lat.precision) == ("openvino", "bf16") else lat.runtime
        if row not in self.runtimes:
            raise ValueError(f"prune.latency.runtime: {row} is not in runtimes {self.runtimes} (validate "
                             "measures the runtime the budget is asked on)")
        if not b.min <= lat.batch <= b.max:
            raise ValueError(f"prune.latency.batch: {lat.batch} is outside export.batch [{b.min}, {b.max}]")
        if lat.precision == "int8" and f"{lat.runtime}-int8" not in self.quantize.formats:
            raise ValueError(f"prune.latency.precision int8: add {lat.runtime}-int8 to quantize.formats (validate "
                             "measures the budget on that row)")
        if lat.runtime == "tensorrt" and lat.precision != self.compile.precision:
            raise ValueError(f"prune.latency.precision: {lat.precision} on tensorrt, but compile.precision is "
                             f"{self.compile.precision}; set them alike (validate measures the engines compile builds)")

    def _check_quantize(self) -> None:
        q = self.quantize
        if not q.formats:
            return
        for fmt in q.formats:
            if fmt == "openvino-int8" and not {"openvino", "openvino-bf16"} & set(self.runtimes):
                raise ValueError(f"quantize.formats: {fmt} is validated on openvino, which is not in runtimes "
                                 f"{self.runtimes}")
            if fmt != "openvino-int8" and runtime_of(fmt) not in self.runtimes:
                raise ValueError(f"quantize.formats: {fmt} is validated on {runtime_of(fmt)}, which is not in runtimes "
                                 f"{self.runtimes}")
        if len(set(q.formats)) != len(q.formats):
            raise ValueError(f"quantize.formats: {q.formats} names a format twice")
        if self.data.source == "synthetic":
            raise ValueError("quantize: calibration needs real images (data.source digits or folder); synthetic noise "
                             "would set the activation ranges of noise")
        if q.calibration > self.data.calibration:
            raise ValueError(f"quantize.calibration: {q.calibration} images asked, data.calibration has "
                             f"{self.data.calibration}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def key_docs(model: type[BaseModel] = Recipe, prefix: str = "", defaults: BaseModel | None = None
             ) -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every recipe key, for `amp-deploy check --keys`."""
    rows = []
    for name, f in model.model_fields.items():
        key = prefix + (f.alias or name)
        value = getattr(defaults, name) if defaults is not None else (
            None if f.is_required() else f.get_default(call_default_factory=True))
        sub = _submodel(f.annotation)
        if sub is not None:
            rows.append((key, "", f.description or ""))
            rows += key_docs(sub, key + ".", value if isinstance(value, sub) else None)
            continue
        default = "required" if f.is_required() and defaults is None else json.dumps(value)
        rows.append((key, default, f.description or ""))
    return rows


def keys_markdown() -> str:
    """docs/keys.md: every recipe key, its default and meaning, from the schema itself (the same rows
    as `amp-deploy check --keys`); tests/test_docs.py fails when the file and this disagree."""
    lines = ["# Recipe keys", "",
             "Generated from the recipe schema (`amp_deploy/recipe.py`) by "
             "`amp-deploy check --keys --format md > docs/keys.md`; do not edit by hand.",
             "Why the defaults are what they are: the topic pages the README lists.", "",
             "| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in key_docs():
        cell = meaning.replace("|", "\\|")
        lines.append(f"| `{key}` | {'`' + default + '`' if default else ''} | {cell} |")
    return "\n".join(lines) + "\n"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    import typing

    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


# Keys holding paths: relative paths are resolved against the recipe's folder (in the file) or
# the working directory (on the command line), so a build does not depend on where it runs.
_PATH_KEYS = (("model", "pretrained"), ("data", "path"), ("data", "class_names"), ("distill", "path"))


def parse_override(item: str) -> tuple[list[str], Any]:
    """`prune.threshold=0.02` -> (["prune", "threshold"], 0.02); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. prune.threshold=0.02")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set(doc: dict, keys: list[str], value: Any) -> None:
    node = doc
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = node[k] = {}
        node = child
    node[keys[-1]] = value


def _resolve_paths(doc: dict, base: Path) -> None:
    for section, key in _PATH_KEYS:
        node = doc.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = str((base / Path(node[key]).expanduser()).resolve())


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2's float rule: PyYAML (YAML 1.1) reads 1e-3 and 3e4 as strings; users write numbers so.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give the recipe's YAML file")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        doc = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping, got {type(doc).__name__}")
    return doc


_UNION_TAGS = ("float", "int", "str", "bool", "list", "dict", "none")


def format_errors(err: ValidationError) -> list[str]:
    out: list[str] = []
    unions: dict[str, list[str]] = {}  # a key with a union type: one line with every member's complaint
    for e in err.errors():
        parts = ["validate" if p == "validate_" else str(p) for p in e["loc"]]
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        if parts and (parts[-1] in _UNION_TAGS or parts[-1].startswith(("literal[", "list[", "dict["))):
            key = ".".join(parts[:-1])
            if key not in unions:
                unions[key] = []
                out.append(key)  # placeholder, filled below in order
            unions[key].append(msg)
            continue
        loc = ".".join(parts)
        # Cross-field checks name their keys themselves.
        out.append(msg if not loc or msg.startswith((f"{loc}.", f"{loc}:", f"{loc} ")) else f"{loc}: {msg}")
    return [f"{line}: " + ", or ".join(unions[line]) if line in unions else line for line in out]


def recipe_problems(doc: dict) -> tuple[Recipe | None, list[str]]:
    """Validate a recipe document; return the recipe or every problem found."""
    try:
        return Recipe.model_validate(doc), []
    except ValidationError as e:
        return None, format_errors(e)


def recipe_document(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The recipe file as a dict, with paths resolved and command-line overrides applied."""
    path = Path(path)
    doc = read_yaml(path)
    _resolve_paths(doc, path.parent)
    for item in overrides:
        keys, value = parse_override(item)
        sub: dict = {}
        _set(sub, keys, value)
        _resolve_paths(sub, Path.cwd())
        _set(doc, keys, _get(sub, keys))
    return doc


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raise UserError naming every problem on one line."""
    recipe, problems = recipe_problems(recipe_document(path, overrides))
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return recipe


def _get(doc: dict, keys: list[str]) -> Any:
    for k in keys:
        doc = doc[k]
    return doc


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (saved beside the report)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
