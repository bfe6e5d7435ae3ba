"""The embedded default model: a small timm ViT trained on sklearn's bundled digits.

`python -m amp_deploy.digits` retrains it from scratch with fixed seeds and writes
amp_deploy/assets/digits_vit.safetensors (about two minutes on 2 CPU cores). Inputs go through the
same timm eval transform that `amp-deploy build` uses, so the weights see what the tool feeds them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

ASSET = Path(__file__).parent / "assets" / "digits_vit.safetensors"
MODEL_NAME = "vit_tiny_patch16_224"
# Also written out in recipes/quickstart.yaml; a test keeps the two the same.
MODEL_KWARGS = {
    "img_size": 8,
    "patch_size": 2,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "num_classes": 10,
    "class_token": False,
    "global_pool": "avg",
    "pretrained_cfg_overlay": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0,
                               "interpolation": "bilinear"},
}


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel, padding with the normalised background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def train_digits_vit(epochs: int = 100, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                     log=print, depth: int | None = None) -> tuple[torch.nn.Module, float]:
    """Train the embedded model (or a deeper variant); return it (eval mode) and its test top-1."""
    from amp_deploy.data import digits_images, digits_split
    from amp_deploy.prune.families import load_timm

    torch.manual_seed(seed)
    loaded = load_timm(MODEL_NAME, False, {**MODEL_KWARGS, "depth": depth or MODEL_KWARGS["depth"]})
    model = loaded.model
    images, labels = digits_images()
    x = torch.stack([loaded.transform(im) for im in images])
    y = torch.as_tensor(labels, dtype=torch.long)
    train, test = (torch.as_tensor(i) for i in digits_split())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            loss = F.cross_entropy(model(shift(x[b], gen)), y[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            acc = accuracy(model, x[test], y[test])
            log(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  test top-1 {acc:.2%}  {time.perf_counter() - start:.0f}s")
    model.eval()
    return model, accuracy(model, x[test], y[test])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    import argparse

    from safetensors.torch import save_file

    from amp_deploy.files import atomic_path

    ap = argparse.ArgumentParser(description="Train the embedded digits ViT (fixed seeds).")
    ap.add_argument("--depth", type=int, default=MODEL_KWARGS["depth"], help="blocks (4: the embedded model)")
    ap.add_argument("--out", default=str(ASSET), help="where to write the safetensors file")
    args = ap.parse_args()
    model, acc = train_digits_vit(depth=args.depth)
    with atomic_path(args.out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"test_top1": f"{acc:.4f}", "model": MODEL_NAME, "depth": str(args.depth)})
    print(f"wrote {args.out} (test top-1 {acc:.2%})")


if __name__ == "__main__":
    main()
