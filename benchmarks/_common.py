"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
from pathlib import Path


def print_table(headers: list[str], rows: list[list], title: str = "") -> str:
    """Print a Markdown table (also returned), so results paste into RESULTS.md as they are."""
    lines = ([f"### {title}", ""] if title else []) + [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path | None, obj) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=2))
