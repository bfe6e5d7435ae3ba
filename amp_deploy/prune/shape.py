"""A block's pruned structure as one value: its MLP width and its attention head count.

Every place that chooses, rebuilds, stores or compares the structure of a pruned model passes one
list of `BlockShape`, first block first: the search's result, the latency budget's choice, the
rebuild, the checkpoint's metadata, search.json, the report and compare. `heads` is None where the
model's attention is of no kind whose heads are known (its heads are never cut); a width-only
record (a checkpoint or search.json from before heads, widths alone) reads as every head kept.

Written as JSON, a list of shapes is a list of `[width, heads]` pairs (`heads` null where unknown).
report.json keeps its documented `widths` and `heads` lists (DESIGN.md); they are written from the
shapes in one place (`report_section`) and read back into shapes by `from_report`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class BlockShape(NamedTuple):
    width: int  # hidden neurons of the block's MLP
    heads: int | None = None  # attention heads (None: not known, every head kept)


class HasShapes:
    """`widths` and `heads` read from a `shapes` attribute (a search's result, a budget's choice)."""

    shapes: list[BlockShape]

    @property
    def widths(self) -> list[int]:
        return widths_of(self.shapes)

    @property
    def heads(self) -> list[int] | None:
        """Head counts per block where they were chosen, else None (every head kept)."""
        return heads_of(self.shapes)


def shapes_of(widths: Sequence[int], heads: Sequence[int] | None = None) -> list[BlockShape]:
    """Shapes from a list of widths and, where known, a list of head counts of the same length."""
    if heads is not None and len(heads) != len(widths):
        raise ValueError(f"{len(widths)} widths but {len(heads)} head counts")
    return [BlockShape(int(w), None if heads is None else int(h))
            for w, h in zip(widths, heads if heads is not None else [None] * len(widths))]


def widths_of(shapes: Sequence[BlockShape]) -> list[int]:
    return [s.width for s in shapes]


def heads_of(shapes: Sequence[BlockShape]) -> list[int] | None:
    """The head counts, or None where the heads are not known."""
    return None if any(s.heads is None for s in shapes) else [s.heads for s in shapes]


def to_json(shapes: Sequence[BlockShape]) -> list[list[int | None]]:
    return [[s.width, s.heads] for s in shapes]


def from_json(value: Any) -> list[BlockShape]:
    """Shapes from their JSON form (a list of [width, heads] pairs, or a JSON string of it)."""
    if isinstance(value, str):
        value = json.loads(value)
    return [BlockShape(int(w), None if h is None else int(h)) for w, h in value]


def from_record(record: Mapping[str, Any], prefix: str = "") -> list[BlockShape] | None:
    """The shapes a record holds under `{prefix}shapes`; a record from before shapes, under
    `{prefix}widths` and `{prefix}heads` (checkpoint metadata holds JSON strings, search.json lists).
    None when the record holds neither."""
    if f"{prefix}shapes" in record:
        return from_json(record[f"{prefix}shapes"])
    if f"{prefix}widths" not in record:
        return None

    def value(key: str):
        v = record.get(key)
        return json.loads(v) if isinstance(v, str) else v

    return shapes_of(value(f"{prefix}widths"), value(f"{prefix}heads"))


def recorded_shapes(record: Mapping[str, Any]) -> tuple[list[BlockShape] | None, list[BlockShape] | None]:
    """A record's shapes and the shapes it was pruned from (`original_`): search.json and a
    checkpoint's metadata, either as written now or from before shapes (None where not recorded)."""
    return from_record(record), from_record(record, "original_")


def report_section(original: Sequence[BlockShape], pruned: Sequence[BlockShape]) -> dict[str, Any]:
    """report.json's documented `widths` and `heads` sections from the shapes."""
    return {"widths": {"original": widths_of(original), "pruned": widths_of(pruned)},
            "heads": {"original": heads_of(original), "pruned": heads_of(pruned)}}


def from_report(rep: Mapping[str, Any], which: str) -> list[BlockShape]:
    """`which` ("original" or "pruned") shapes of a report.json (a report from before heads: widths only)."""
    heads = (rep.get("heads") or {}).get(which)
    return shapes_of(rep["widths"][which], heads)


def heads_cut(original: Sequence[BlockShape], pruned: Sequence[BlockShape]) -> bool:
    """Whether any block lost attention heads."""
    return any(p.heads is not None and o.heads is not None and p.heads < o.heads for o, p in zip(original, pruned))
