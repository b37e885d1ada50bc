"""The GPU check's state: its time budget, the JSON it is kept in, and a section's status.

Nothing here needs torch, a clone or a GPU. The orchestrator (``vaepatch.bench.gpu``) and the sections
(``vaepatch.bench.gpu.sections``) write through ``write_atomic``, so a run killed at any moment leaves
the last complete file, never half of one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from vaepatch.runs.events import strict
from vaepatch.runs.manifest import write_atomic  # the report and sections write through it

__all__ = ["SCHEMA", "STATUSES", "dumps", "write_atomic", "read_json", "Budget", "section_status"]

SCHEMA = "vaepatch-gpu-check/1"
STATUSES = ("ok", "failed", "error", "timeout", "skipped", "running", "pending")


def dumps(obj) -> str:
    """Strict JSON, like events.jsonl: non-finite floats become null."""
    return json.dumps(strict(obj), indent=1, default=str, allow_nan=False) + "\n"


def read_json(path) -> dict | None:
    """The JSON object at ``path``, or None if it is missing or not (yet) whole."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Budget:
    """A wall-clock budget for the whole check: what is left, and how much of it a section may take.

    ``allot(cap_s, min_s)``: the seconds a section gets, ``min(cap_s, left - reserve_s)``, or None with
    the reason when that is under ``min_s`` (the section would not finish anything worth keeping).
    ``reserve_s`` is kept back for writing the report after the last section.
    """

    def __init__(self, total_s: float, reserve_s: float = 5.0, clock=time.monotonic):
        self.total_s, self.reserve_s, self.clock = float(total_s), float(reserve_s), clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def allot(self, cap_s: float, min_s: float) -> tuple[float | None, str]:
        usable = self.left() - self.reserve_s
        if usable < min_s:
            return None, (f"skipped: needs at least {min_s:.0f} s, {max(usable, 0):.0f} s left of --budget-s "
                          f"{self.total_s:.0f}")
        return min(cap_s, usable), ""


def section_status(rows_ok: bool, error: str | None = None) -> str:
    return "error" if error else ("ok" if rows_ok else "failed")
