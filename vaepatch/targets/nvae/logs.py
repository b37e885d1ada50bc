"""NVlabs/NVAE's own ``log.txt``: its validation NELBO (nats/image) for ``vaepatch compare``."""
from __future__ import annotations

import re
from pathlib import Path

from vaepatch.runs.logs import UpstreamLog

__all__ = ["LOG", "UPSTREAM_LOG"]

LOG = "log.txt"
# NVAE's log lines for the validation NELBO (nats/image): after each eval epoch, and the final one
_EVAL = re.compile(r"\b(?:final valid nelbo|valid_nelbo) (\S+)")


def eval_losses(logdir: Path, problems: list) -> list:
    log = Path(logdir) / LOG
    if not log.is_file():
        return []
    evals = []
    for value in _EVAL.findall(log.read_text(errors="replace")):
        try:
            evals.append(float(value))
        except ValueError:
            problems.append(f"{log}: unreadable validation NELBO {value!r}")
    return evals


UPSTREAM_LOG = UpstreamLog("nvae", eval_losses)
