"""`vaepatch compare`: runs grouped by variant, counted from their exact per-step events.

Reads only ``run.json`` and ``events.jsonl`` of each run directory. A run whose files are
missing, unreadable or truncated is still listed, with what is wrong; it never crashes the
report and is never silently dropped.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vaepatch import events as _events

__all__ = ["Run", "load_run", "find_runs", "group", "table", "main"]

FINAL_FRACTION = 0.1  # "final loss": mean finite loss over the last 10% of logged steps


@dataclass
class Run:
    """One run directory: its manifest, its counts, and anything wrong with it."""

    path: Path
    variant: str
    seed: object = None
    status: str = "unknown"
    counts: _events.Counts = field(default_factory=_events.Counts)
    final_loss: float | None = None
    problems: list[str] = field(default_factory=list)


def _final_loss(events: list[dict]) -> float | None:
    steps = sorted({e["step"] for e in events})
    if not steps:
        return None
    tail = set(steps[-max(1, math.ceil(len(steps) * FINAL_FRACTION)):])
    losses = [e["loss"] for e in events if e["step"] in tail and e["loss"] is not None]
    return sum(losses) / len(losses) if losses else None


def load_run(path) -> Run:
    """Read one run directory; problems are collected in ``Run.problems``, never raised."""
    path = Path(path)
    run = Run(path, variant=f"? ({path.name})")
    try:
        manifest = json.loads((path / "run.json").read_text())
        run.variant = manifest.get("variant", "?")
        run.seed = manifest.get("seed")
        run.status = manifest.get("status", "unknown")
        if run.status == "running":
            run.status = "running, or killed (no end recorded)"
    except FileNotFoundError:
        run.problems.append(f"{path / 'run.json'}: missing (not a vaepatch run directory?)")
    except ValueError as e:
        run.problems.append(f"{path / 'run.json'}: not readable JSON ({e})")
    try:
        log = _events.read(path)
    except FileNotFoundError as e:
        run.problems.append(str(e))
        return run
    run.problems.extend(log.problems)
    if log.duplicates:
        run.problems.append(f"{log.path}: {log.duplicates} duplicate (step, rank) records ignored")
    run.counts = _events.count(log.events)
    run.final_loss = _final_loss(log.events)
    return run


def find_runs(paths) -> list[Path]:
    """Run directories among ``paths``: each path itself if it holds run.json/events.jsonl, else its
    sub-directories that do (one level), so ``vaepatch compare runs/`` works."""
    found = []
    for p in map(Path, paths):
        if (p / "run.json").exists() or (p / _events.FILENAME).exists() or not p.is_dir():
            found.append(p)
            continue
        children = sorted(c for c in p.iterdir() if (c / "run.json").exists() or (c / _events.FILENAME).exists())
        found.extend(children or [p])
    return found


def group(runs: list[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.variant, []).append(run)
    return grouped


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}"


COLUMNS = ("variant", "runs", "NaN steps", "high-grad skips", "skipped updates", "first NaN step", "final loss")


def rows(runs: list[Run]) -> list[list[str]]:
    out = []
    for variant, members in group(runs).items():
        c = [r.counts for r in members]
        out.append([variant, str(len(members)),
                    _mean_std([x.nan_steps for x in c]), _mean_std([x.grad_skips for x in c]),
                    _mean_std([x.skipped for x in c]), _mean_std([x.first_nan_step for x in c]),
                    _mean_std([r.final_loss for r in members])])
    return out


def table(runs: list[Run]) -> str:
    """Markdown table, mean ± std over the runs of each variant (the paper's Table 4 shape)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(runs)]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vaepatch compare",
                                     description="NaN steps and skipped updates per variant, from runs' events.jsonl")
    parser.add_argument("runs", nargs="+", help="run directories (or folders of them)")
    args = parser.parse_args(argv)
    runs = [load_run(p) for p in find_runs(args.runs)]
    print(table(runs))
    for run in runs:
        for problem in run.problems:
            print(f"warning: {run.path}: {problem}", file=sys.stderr)
    return 0
