"""PNG figures of a report's own data, written into a folder beside the report and linked from report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amp_deploy.files import atomic_path


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
