"""Markdown tables: the one way every bench, report and check writes one."""
from __future__ import annotations

__all__ = ["table", "cell"]


def cell(value) -> str:
    """A value as table-cell text: None is an em dash; pipes and newlines cannot break the row."""
    return "—" if value is None else str(value).replace("|", "/").replace("\n", " ")


def table(header: list, rows: list) -> list[str]:
    """The table's lines: header, separator, one line per row."""
    return ["| " + " | ".join(cell(c) for c in header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
