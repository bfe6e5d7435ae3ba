"""Compensation (prune.compensate) at fixed cuts, no training: what the re-fit recovers, on images it never saw.

    python benchmarks/compensate_quality.py --recipe recipes/dinov2_vits14_fashion.yaml --out out/compensate \\
        [--keep 0.5 0.25] [--heads 3] [--dampings 0.001 0.01 0.1] [--size 56]

Every block's MLP is cut to the same fraction of its neurons (the top Taylor scores of the recipe's
criterion; `--heads H`: every block also to H heads), then re-fitted with each mode (none: the weights as
cut; bias: the removed units' mean folded into the bias; ridge at each damping) from the statistics of
the recipe's calibration images. Judged on images the fit never saw: the recipe's holdout images
(cosine of the output to the original's, the image-image divergence at the recipe's temperature) and
another data set, scikit-learn's handwritten digits through the model's own transform (cosine). Also
the guard: the share of re-fits it declined (a re-fit that reconstructs worse on the validation images).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_deploy.data import Split  # noqa: E402
from amp_deploy.measure import metrics as M  # noqa: E402
from amp_deploy.pipeline.context import Context  # noqa: E402
from amp_deploy.pipeline.stages import stage_score  # noqa: E402
from amp_deploy.prune.compensate import Compensator, collect  # noqa: E402
from amp_deploy.prune.rebuild import apply_shapes  # noqa: E402
from amp_deploy.prune.score import Divergence  # noqa: E402
from amp_deploy.prune.search import uniform_widths  # noqa: E402
from amp_deploy.prune.shape import shapes_of  # noqa: E402
from amp_deploy.recipe import load_recipe  # noqa: E402
from benchmarks._common import print_table, write_json  # noqa: E402


def digits_split(transform, n: int) -> Split:
    """scikit-learn's 8x8 digits as RGB images through the model's transform (another data set)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).convert("RGB") for i in range(n)]
    return Split(torch.stack([transform(im) for im in imgs]), torch.as_tensor(d.target[:n]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--heads", type=int, nargs="*", default=[])
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--digits", type=int, default=500)
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    recipe = load_recipe(a.recipe, ["prune.heads=true", *a.set] if a.heads else a.set)
    ctx = Context.create(recipe, a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    if not ctx.folder.scores.is_file():
        stage_score(ctx)
    scores = ctx.folder.read_scores(recipe.prune.taylor)
    head_scores = ctx.folder.read_head_scores(recipe.prune.taylor) if a.heads else None
    data, bs, cpu = ctx.data(), recipe.data.batch_size, torch.device("cpu")
    loaded = ctx.original()
    loaded.model.eval()
    other = digits_split(loaded.transform, a.digits)
    ref = M.predict(loaded.model, data.holdout, bs, cpu)
    ref_other = M.predict(loaded.model, other, bs, cpu)
    orig_knn = M.knn_top1(*M.predict_labelled(loaded.model, data.calibration, bs, cpu), ref, data.holdout.labels)
    batches = lambda split: (x for x, _ in split.batches(bs))  # noqa: E731
    fit = collect(loaded, batches(data.calibration), cpu, bool(a.heads), a.tokens)
    check = collect(loaded, batches(data.validation), cpu, bool(a.heads), a.tokens)
    t = recipe.prune.temperature or 20.0
    modes = [("none", None), ("bias", None), *[("ridge", d) for d in a.dampings]]
    rows, record = [], []
    for keep in a.keep:
        for heads in a.heads or [None]:
            widths = uniform_widths(loaded.widths(), keep, recipe.prune.align)
            shapes = shapes_of(widths, [heads] * len(widths) if heads else None)
            for mode, damping in modes:
                model = ctx.original()
                comp = Compensator(fit, check, mode, damping or 0.01)
                apply_shapes(model, shapes, scores, head_scores, comp)
                model.model.eval()
                got = M.predict(model.model, data.holdout, bs, cpu)
                got_other = M.predict(model.model, other, bs, cpu)
                bank, labels = M.predict_labelled(model.model, data.calibration, bs, cpu)
                div = Divergence("image-image", t)
                d = sum(div(got[i:i + 128], None, ref[i:i + 128]).double().sum().item()
                        for i in range(0, len(ref), 128)) / len(ref)
                row = {"keep": keep, "heads": heads, "mode": mode, "damping": damping,
                       "cosine": M.agreement(ref, got)["cosine_mean"], "divergence": d,
                       "knn": M.knn_top1(bank, labels, got, data.holdout.labels),
                       "cosine_other": M.agreement(ref_other, got_other)["cosine_mean"],
                       "declined": sum(x.declined for x in comp.decisions.values()), "refits": len(comp.decisions),
                       "refit_seconds": round(comp.seconds, 2)}
                record.append(row)
                rows.append([f"{keep:g}", heads or "all", mode, f"{damping:g}" if damping else "", f"{row['cosine']:.4f}",
                             f"{row['divergence']:.4f}", f"{row['knn']:.2f}", f"{row['cosine_other']:.4f}",
                             f"{row['declined']} of {row['refits']}" if mode != "none" else "", row["refit_seconds"]])
                print(rows[-1], flush=True)
    print_table(["MLP keeps", "heads", "mode", "damping", "holdout cosine", "divergence", "k-NN %",
                 "digits cosine", "declined", "re-fit s"], rows,
                f"{recipe.name}: every block cut alike, no training; original k-NN {orig_knn:.2f}; "
                f"fit on {len(data.calibration)} calibration images ({a.tokens} tokens each), judged on "
                f"{len(data.holdout)} holdout images and {a.digits} digits")
    write_json(a.json, record)


if __name__ == "__main__":
    main()
