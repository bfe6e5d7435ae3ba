"""Accuracy vs parameter budget for AMP and its baselines, on the embedded digits model.

    .venv/bin/python benchmarks/prune_quality.py [--budgets 0.75 0.65 0.61] [--distill 30] [--json out.json]

Methods: entropy-adaptive (AMP), ce-adaptive (labels), magnitude-adaptive (weight norms),
entropy-uniform (AMP scores, same width everywhere) and random-uniform. Adaptive methods meet each
budget with the outer threshold search; uniform methods take the largest keep ratio within it.
No fine-tuning, except the '+ distill' rows: entropy-adaptive and entropy-uniform then distilled from
the original for `--distill` epochs with the distill stage's defaults (KL, AdamW 3e-4, batch 64, one-pixel
shifts, the training split minus the validation images). Top-1 and agreement with the original on the
360-image holdout split.

`--oracle` adds a reference row that is not a method: ce-adaptive whose search is run on the
holdout itself (it peeks at the test labels), to show how much any per-block allocation of these
scores could win on this model.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402

from amp_deploy import digits  # noqa: E402
from amp_deploy.data import distill_split, load_digits_data  # noqa: E402
from amp_deploy.prune.distill import distill  # noqa: E402
from amp_deploy.prune.families import count_params as params  # noqa: E402
from amp_deploy.prune.families import load_timm  # noqa: E402
from amp_deploy.prune.rebuild import apply_widths  # noqa: E402
from amp_deploy.prune.score import loss_fn, magnitude_scores, random_scores, taylor_scores  # noqa: E402
from amp_deploy.prune.search import adaptive_widths, budget_widths, uniform_widths  # noqa: E402


def distilled(pruned, base, images, epochs: int):
    """A copy of `pruned` distilled from `base` with the recipe defaults (as `distill.epochs=N` would)."""
    student = copy.deepcopy(pruned)
    distill(student.model, copy.deepcopy(base.model), images, epochs=epochs, lr=3e-4, batch_size=64, warmup=2.0,
            weight_decay=0.05, loss="kl", temperature=1.0, seed=0, augment=digits.shift)
    student.model.eval()
    return student


@torch.no_grad()
def evaluate(model, holdout, ref_pred):
    pred = model(holdout.images).argmax(-1)
    return (pred == holdout.labels).float().mean().item() * 100, (pred == ref_pred).float().mean().item() * 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.65, 0.61])
    ap.add_argument("--json", default=None)
    ap.add_argument("--weights", default=str(digits.ASSET), help="weights of a digits ViT (default: the embedded one)")
    ap.add_argument("--oracle", action="store_true", help="add the ce search run on the holdout (a reference, not a method)")
    ap.add_argument("--depth", type=int, default=digits.MODEL_KWARGS["depth"], help="its depth, if retrained deeper")
    ap.add_argument("--distill", type=int, default=30, metavar="EPOCHS",
                    help="also distil entropy-adaptive and entropy-uniform for this many epochs (0: no distilled rows)")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = load_timm(digits.MODEL_NAME, args.weights, {**digits.MODEL_KWARGS, "depth": args.depth})
    data = load_digits_data(calibration=512, validation=256, holdout=360, seed=0, transform=base.transform)
    total = params(base.model)
    with torch.no_grad():
        ref_pred = base.model(data.holdout.images).argmax(-1)
    acc0, _ = evaluate(base.model, data.holdout, ref_pred)
    cpu = torch.device("cpu")
    ent, ce = loss_fn("entropy", "logits", 15.0), loss_fn("ce", "logits", 15.0)
    scores = {
        "entropy": taylor_scores(base, data.calibration.batches(64), ent, cpu)["abs"],
        "ce": taylor_scores(base, data.calibration.batches(64), ce, cpu)["abs"],
        "magnitude": magnitude_scores(base),
        "random": random_scores(base, 0),
    }
    methods = [("entropy-adaptive", "entropy", "adaptive", ent), ("ce-adaptive", "ce", "adaptive", ce),
               ("magnitude-adaptive", "magnitude", "adaptive", ent), ("entropy-uniform", "entropy", "uniform", None),
               ("random-uniform", "random", "uniform", None)]
    if args.oracle:
        methods.append(("oracle (ce on holdout)", "ce", "adaptive", ce))
    train = distill_split("digits", data, distill_path=None, validation=256, seed=0, transform=base.transform).images
    rows, records = [], []
    for budget in args.budgets:
        limit = int(budget * total)
        for label, crit, mode, loss in methods:
            if mode == "adaptive":
                val = data.holdout if label.startswith("oracle") else data.validation

                def run(m, t, s=scores[crit], loss=loss, val=val):
                    return adaptive_widths(m, s, val, batch_size=64, loss=loss, threshold=t)
                pruned, _, _, _ = budget_widths(lambda: copy.deepcopy(base), limit, run)
            else:
                pruned = None
                for k in range(256, 0, -1):  # largest uniform keep ratio within the budget
                    cand = copy.deepcopy(base)
                    apply_widths(cand, scores[crit], uniform_widths(cand.widths(), k / 256, 1))
                    if params(cand.model) <= limit:
                        pruned = cand
                        break
            variants = [(label, pruned)]
            if args.distill and label in ("entropy-adaptive", "entropy-uniform"):
                variants.append((f"{label} + distill", distilled(pruned, base, train, args.distill)))
            for name, model in variants:
                acc, agree = evaluate(model.model, data.holdout, ref_pred)
                frac = params(model.model) / total
                kept = sum(model.widths()) / sum(base.widths())
                rows.append([f"{budget:.2f}", name, f"{frac:.3f}", f"{1 - kept:.0%}", f"{acc:.2f}", f"{acc - acc0:+.2f}",
                             f"{agree:.2f}", " ".join(map(str, model.widths()))])
                records.append({"budget": budget, "method": name, "params_fraction": frac, "top1": acc,
                                "agreement": agree, "widths": model.widths()})
    print(f"original: {total:,} parameters, holdout top-1 {acc0:.2f}%\n")
    print_table(["budget", "method", "params frac", "MLP neurons removed", "top-1 %", "vs original", "agreement %", "widths"],
                rows, "Accuracy vs parameter budget (digits ViT; '+ distill': the build's distill stage defaults)")
    write_json(args.json, {"original_top1": acc0, "params": total, "rows": records})


if __name__ == "__main__":
    main()
