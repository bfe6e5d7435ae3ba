"""Accuracy vs parameter budget for AMP and its baselines, on the embedded digits model.

    .venv/bin/python benchmarks/prune_quality.py [--budgets 0.75 0.65 0.61] [--json out.json]

Methods: entropy-adaptive (AMP), ce-adaptive (labels), magnitude-adaptive (weight norms),
entropy-uniform (AMP scores, same width everywhere) and random-uniform. Adaptive methods meet each
budget with the outer threshold search; uniform methods take the largest keep ratio within it.
No fine-tuning. Top-1 and agreement with the original on the 360-image holdout split.

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
from amp_deploy.data import load_digits_data  # noqa: E402
from amp_deploy.prune.families import count_params as params  # noqa: E402
from amp_deploy.prune.families import load_timm  # noqa: E402
from amp_deploy.prune.rebuild import apply_widths  # noqa: E402
from amp_deploy.prune.score import loss_fn, magnitude_scores, random_scores, taylor_scores  # noqa: E402
from amp_deploy.prune.search import adaptive_widths, budget_widths, uniform_widths  # noqa: E402


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
            acc, agree = evaluate(pruned.model, data.holdout, ref_pred)
            frac = params(pruned.model) / total
            kept = sum(pruned.widths()) / sum(base.widths())
            rows.append([f"{budget:.2f}", label, f"{frac:.3f}", f"{1 - kept:.0%}", f"{acc:.2f}", f"{acc - acc0:+.2f}",
                         f"{agree:.2f}", " ".join(map(str, pruned.widths()))])
            records.append({"budget": budget, "method": label, "params_fraction": frac, "top1": acc,
                            "agreement": agree, "widths": pruned.widths()})
    print(f"original: {total:,} parameters, holdout top-1 {acc0:.2f}%\n")
    print_table(["budget", "method", "params frac", "MLP neurons removed", "top-1 %", "vs original", "agreement %", "widths"],
                rows, "Accuracy vs parameter budget (digits ViT, no fine-tuning)")
    write_json(args.json, {"original_top1": acc0, "params": total, "rows": records})


if __name__ == "__main__":
    main()
