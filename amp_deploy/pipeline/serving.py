"""A Triton model repository entry for a build folder: the folder's files, handed to deploy.triton."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from amp_deploy.deploy.openvino import ir_files
from amp_deploy.deploy.triton import write_model_repository
from amp_deploy.errors import UserError
from amp_deploy.pipeline.folder import BuildFolder
from amp_deploy.pipeline.manifest import Manifest


def _check_served(out: Path, files: list[Path], manifest: Manifest) -> None:
    """Every file an entry would serve is the file the build wrote: its hash as manifest.json recorded
    it (a truncated or edited file is named, never copied into a model repository); a file no stage
    recorded must at least parse (an ONNX graph)."""
    from amp_deploy.files import content_hash

    recorded = {name: h for entry in manifest.stages.values() for name, h in (entry.get("outputs") or {}).items()}
    for f in files:
        if f.name in recorded:
            if content_hash(f) != recorded[f.name]:
                raise UserError(f"{f}: not the file the build wrote (its hash differs from manifest.json's: damaged "
                                f"or edited); run `amp-deploy build` on {out} again to remake it")
        elif f.suffix == ".onnx":
            import onnx

            try:
                onnx.load(str(f), load_external_data=False)
            except Exception as e:  # noqa: BLE001 - any parse error: the file is not servable
                raise UserError(f"{f}: not a readable ONNX model ({type(e).__name__}); run `amp-deploy build` on "
                                f"{out} again to remake it") from None


def triton_entry(out: Path, repo: Path, name: str | None = None,
                 backend: Literal["onnxruntime", "tensorrt", "openvino", "openvino-int8"] = "onnxruntime",
                 which: Literal["pruned", "original"] = "pruned") -> Path:
    """Write REPO/NAME (NAME: the recipe's name by default) serving the build's pruned (or original)
    model as ONNX or as its TensorRT plan."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise UserError(f"--repo {repo}: exists and is not a folder (a Triton model repository is a folder)")
    folder = BuildFolder(Path(out))
    recipe = folder.read_recipe_doc()
    onnx_path = folder.onnx(which)
    if not onnx_path.is_file():
        raise UserError(f"{out}: no {onnx_path.name}; run `amp-deploy build` (or `export`) first")
    plan = None
    if backend == "tensorrt":
        plan = folder.plan(which)
        if not plan.is_file():
            raise UserError(f"{out}: no {plan.name}; build engines with `amp-deploy compile` on a GPU with TensorRT")
    ir = None
    if backend.startswith("openvino"):
        ir = folder.ir(which) if backend == "openvino" else folder.quantized(which, backend)
        if not all(p.is_file() for p in ir_files(ir)):
            how = "runtimes [openvino]" if backend == "openvino" else "quantize.formats [openvino-int8]"
            raise UserError(f"{out}: no {ir.name}; build with {how} first")
    manifest = Manifest(folder.manifest)
    served = [onnx_path, *( [plan] if plan else []), *(ir_files(ir) if ir else [])]
    from amp_deploy.deploy.export import external_files

    served += external_files(onnx_path) if onnx_path.is_file() else []
    _check_served(out, served, manifest)
    stages = list(manifest.stages)
    max_batch = int(((recipe.get("export") or {}).get("batch") or {}).get("max", 8))
    return write_model_repository(repo, name or recipe.get("name") or folder.root.name, onnx_path=onnx_path,
                                  max_batch=max_batch, plan_path=plan, ir_path=ir,
                                  provenance={"source": str(out), "model": which, "backend": backend, "stages": stages})
