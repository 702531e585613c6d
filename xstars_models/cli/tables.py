"""Plain-text tables for ``xstars info``: evaluation results as aligned columns instead of raw JSON.

Metrics are free-form JSON, so the layout follows their shape: a list of records (one dict per
row, e.g. ``{"name": ..., "knn acc": ...}``) or a mapping of row label to record becomes one table;
scalars become ``key: value`` lines; other nesting is shown section by section."""

from __future__ import annotations

from typing import Any

__all__ = ["render_metrics"]


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(not isinstance(v, (dict, list)) for v in value.values())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _table(rows: list[dict[str, Any]], indent: str) -> list[str]:
    """Columns in order of first appearance; numbers right-aligned, text left-aligned."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    numeric = [all(_is_number(row.get(col)) for row in rows) for col in columns]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]

    def line(values: list[str]) -> str:
        return indent + "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return [line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)]


def _render(name: str, value: Any, indent: str) -> list[str]:
    if isinstance(value, list) and value and all(_is_record(v) for v in value):
        return [f"{indent}{name}:", *_table(value, indent + "  ")]
    if isinstance(value, dict) and value and all(_is_record(v) for v in value.values()):
        # A mapping of row label to record: the label is the first column.
        rows = [{"": label, **record} for label, record in value.items()]
        return [f"{indent}{name}:", *_table(rows, indent + "  ")]
    if isinstance(value, dict):
        lines = [f"{indent}{name}:"]
        scalars = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
        lines += [f"{indent}  {k}: {_cell(v)}" for k, v in scalars.items()]
        for key, sub in value.items():
            if isinstance(sub, (dict, list)):
                lines += _render(key, sub, indent + "  ")
        return lines
    if isinstance(value, list):
        return [f"{indent}{name}: {', '.join(_cell(v) for v in value)}"]
    return [f"{indent}{name}: {_cell(value)}"]


def render_metrics(metrics: dict[str, Any]) -> list[str]:
    """Lines showing ``metrics``: top-level scalars as one metric/value table, then each nested
    result as its own section."""
    lines = ["metrics:"]
    scalars = [{"metric": k, "value": v} for k, v in metrics.items() if not isinstance(v, (dict, list))]
    if scalars:
        lines += _table(scalars, "  ")
    for key, value in metrics.items():
        if isinstance(value, (dict, list)):
            lines += _render(key, value, "  ")
    return lines
