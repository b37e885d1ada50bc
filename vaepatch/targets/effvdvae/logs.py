"""Efficient-VDVAE's own log: the validation NELBO its train() writes to TensorBoard, for ``vaepatch compare``.

train() logs ``Losses/nelbo`` (bits/dim: KL + reconstruction) under ``logs-<run.name>/val`` at every
evaluation; a run's ``upstream_logdir`` is that ``logs-<run.name>`` folder. Read back with TensorBoard's
own reader (optional: ``pip install tensorboard``) and turned into nats/dim, the unit of the run's events.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from vaepatch.runs.logs import UpstreamLog

__all__ = ["TAG", "UPSTREAM_LOG"]

TAG = "Losses/nelbo"


def eval_losses(logdir: Path, problems: list) -> list:
    """The validation NELBOs (nats/dim) in step order, from ``logdir/val``'s TensorBoard files."""
    folder = Path(logdir) / "val"
    if not folder.is_dir():
        return []
    if importlib.util.find_spec("tensorboard") is None:
        problems.append(f"{folder}: Efficient-VDVAE's validation NELBO is in TensorBoard files; "
                        "pip install tensorboard to read it")
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    if TAG not in accumulator.Tags().get("scalars", []):
        return []
    return [e.value * math.log(2) for e in sorted(accumulator.Scalars(TAG), key=lambda e: e.step)]


UPSTREAM_LOG = UpstreamLog("effvdvae", eval_losses)
