"""What an upstream logs by itself: its eval losses, or a whole run made without vaepatch's launcher.

Each target registers an :class:`UpstreamLog` from its package (``vaepatch/targets/<name>/``), the
way ``torch.distributions.register_kl`` collects KL rules, so ``vaepatch compare`` reads any
upstream's own log by the ``target`` a ``run.json`` names, without knowing any upstream itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

__all__ = ["UpstreamLog", "register", "for_target", "registered", "read_jsonl_lenient"]


@dataclass(frozen=True)
class UpstreamLog:
    """How to read one upstream's own log.

    ``eval_losses(logdir, problems)``: the eval losses in logged order from the folder a manifest's
    ``upstream_logdir`` names. ``marker`` and ``read_run(path, problems)``: optionally, the file that
    marks a run folder holding only the upstream's log (VDVAE's ``log.jsonl``) and how to read such a
    run into the fields of ``vaepatch.compare.Run`` (``counts``, ``curve``, ``evals``, ``variant``...).
    """

    target: str
    eval_losses: Callable[[Path, list], list]
    marker: Optional[str] = None
    read_run: Optional[Callable[[Path, list], dict]] = None


_LOGS: dict = {}


def register(log: UpstreamLog) -> UpstreamLog:
    _LOGS[log.target] = log
    return log


def for_target(target) -> Optional[UpstreamLog]:
    return _LOGS.get(target)


def registered() -> list:
    return list(_LOGS.values())


def read_jsonl_lenient(path: Path, problems: list) -> list:
    """Records of a JSON-lines file written by another tool (NaN/Infinity literals allowed, as Python's
    json writes them); every line that is not a JSON object is reported in ``problems``."""
    records = []
    try:
        lines = Path(path).read_text(errors="replace").split("\n")
    except OSError as e:
        problems.append(f"{path}: unreadable ({e})")
        return records
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            last = number == len(lines)
            problems.append(f"{path} line {number}: {'truncated last line' if last else 'not JSON'} ({e})")
            continue
        if isinstance(obj, dict):
            records.append(obj)
        else:
            problems.append(f"{path} line {number}: not a JSON object")
    return records
