"""The step recorder every launcher builds on: one event per training step, ``--max-steps``.

A target's launcher subclasses :class:`StepRecorder` with the wrappers that see its upstream's
training step (VDVAE's ``training_step``, NVAE's data queue and grad scaler) and calls
:meth:`StepRecorder.write` once per step.
"""
from __future__ import annotations

from vaepatch.runs.events import EventWriter

__all__ = ["StopAtMaxSteps", "StepRecorder"]


class StopAtMaxSteps(Exception):
    """Raised from inside the training loop when --max-steps is reached (a clean stop)."""


class StepRecorder:
    """This process's events: a writer (given, or opened later with :meth:`open` once the rank is
    known), the ``--max-steps`` stop, and how many steps were logged now or already before."""

    def __init__(self, writer: EventWriter | None = None, max_steps: int | None = None):
        self.writer = writer
        self.max_steps = max_steps
        self.logged = 0
        self.already_logged = 0

    def open(self, path, rank: int) -> EventWriter:
        self.writer = EventWriter(path, rank=rank)
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def check_max_steps(self, step: int) -> None:
        """Stop cleanly before step ``step`` when ``--max-steps`` steps (0 .. max_steps-1) are done."""
        if self.max_steps is not None and step >= self.max_steps:
            raise StopAtMaxSteps(step)

    def write(self, step, loss, grad_norm, skipped, reason, time) -> bool:
        """One step's event (nothing if this rank logged the step before a restart); True if written."""
        if self.writer is None:
            return False
        if self.writer.write(step=int(step), loss=loss, grad_norm=grad_norm, skipped=skipped, reason=reason, time=time):
            self.logged += 1
            return True
        self.already_logged += 1
        return False
