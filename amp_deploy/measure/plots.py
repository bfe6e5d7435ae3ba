"""PNG figures of a report's own data, written into a folder beside the report and linked from report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amp_deploy.files import atomic_path
from amp_deploy.prune.shape import BlockShape, from_report, heads_of, widths_of


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_plots(report: dict[str, Any], folder: Path) -> list[str]:
    """Draw the widths, latency and cosine figures into `folder`; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    w = report["widths"]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(w["original"]) + 2), 3.2))
    blocks = range(len(w["original"]))
    ax.bar(blocks, w["original"], color="#c8d3e0", label="original")
    ax.bar(blocks, w["pruned"], color="#2b6cb0", label="pruned")
    ax.set(xlabel="block", ylabel="MLP hidden width", title="MLP width per block")
    ax.set_xticks(list(blocks))
    ax.legend()
    _save(fig, folder / "widths.png")
    plt.close(fig)
    written.append("widths.png")

    ok = {n: r for n, r in report["runtimes"].items() if r.get("status") == "ok"}
    if ok:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for (name, row), color in zip(ok.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            for model, style in (("original", "--"), ("pruned", "-")):
                pts = sorted((int(b), s["p50"]) for b, s in row["latency_ms"][model].items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, marker="o",
                        label=f"{name} {model}")
        ax.set(xlabel="batch size", ylabel="p50 latency (ms)", title="Latency vs batch size", xscale="log", yscale="log")
        ax.legend(fontsize=8)
        _save(fig, folder / "latency.png")
        plt.close(fig)
        written.append("latency.png")

    losses = (report.get("distill") or {}).get("losses") or []
    if losses:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot(range(1, len(losses) + 1), losses, marker="o", color="#2b6cb0")
        ax.set(xlabel="epoch", ylabel="mean distillation loss", yscale="log",
               title=f"Distillation ({report['distill']['loss']}, {report['distill']['images']} images)")
        _save(fig, folder / "distill.png")
        plt.close(fig)
        written.append("distill.png")

    if report.get("latency_budget"):
        written.append(_budget_plot(plt, report["latency_budget"], from_report(report, "pruned"), folder))

    cos = report["fidelity"].get("cosines") or []
    if cos:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.hist(cos, bins=40, color="#2b6cb0")
        ax.set(xlabel="cosine(pruned, original) per image", ylabel="images",
               title=f"Fidelity on {len(cos)} holdout images")
        _save(fig, folder / "cosine.png")
        plt.close(fig)
        written.append("cosine.png")
    return written


def _budget_plot(plt, lb: dict[str, Any], shapes: list[BlockShape], folder: Path) -> str:
    """The latency table (measured and fitted ratio per width, and per head count where the table has
    a heads axis) with the chosen shapes' widths (and heads) marked."""
    t = lb["table"]
    heads = heads_of(shapes)
    axes_of = [("widths", "MLP width of every block", widths_of(shapes))]
    if t.get("heads") and heads:
        axes_of.append(("heads", "attention heads of every block", heads))
    fig, axes = plt.subplots(1, len(axes_of), figsize=(5.5 * len(axes_of), 3.4), squeeze=False)
    for ax, (key, label, chosen) in zip(axes[0], axes_of):
        row = t if key == "widths" else t["heads"]
        ax.plot(row[key], row["ratio"], "o", color="#c05621", label="measured (median per-round ratio)")
        ax.plot(row[key], row["fitted"], "-", color="#2b6cb0", label="fitted (monotone)")
        for w in chosen:
            ax.axvline(w, color="#718096", alpha=0.35, lw=1)
        ax.set(xlabel=label, ylabel="latency / full model")
        ax.legend(fontsize=8, title=f"grey lines: chosen {key}", title_fontsize=8)
    fig.suptitle(f"{lb['runtime']} {lb['precision']}, batch {lb['batch']}: predicted {lb['predicted_speedup']:.2f}x, "
                 f"measured {lb['measured_speedup']:.2f}x", fontsize=9)
    _save(fig, folder / "latency_budget.png")
    plt.close(fig)
    return "latency_budget.png"
