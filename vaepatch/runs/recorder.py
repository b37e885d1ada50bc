"""The step recorder every launcher builds on: one event per training step, ``--max-steps``, stalls.

A target's launcher subclasses :class:`StepRecorder` with the wrappers that see its upstream's
training step (VDVAE's ``training_step``, NVAE's data queue and grad scaler) and calls
:meth:`StepRecorder.write` once per step. The base keeps the count of steps in a row that made no
progress (update skipped, or loss non-finite); once it reaches ``stall_steps`` the run is stalled:
one line says so, ``on_stall(since)`` lets the launcher mark ``run.json``, and with
``stop_when_stalled`` the run stops cleanly (:class:`StopStalled`). With ``stop_at_nonfinite`` it
stops after the first step whose loss was non-finite (:class:`StopNonfinite`): a bench sweeping
learning rates need not pay for steps after a failure.
"""
from __future__ import annotations

import math
import sys

from vaepatch.runs import tensorboard as _tensorboard
from vaepatch.runs.events import STALL_STEPS, EventWriter

__all__ = ["StopRun", "StopAtMaxSteps", "StopStalled", "StopNonfinite", "StepRecorder", "STALL_STEPS", "STALL_HINT"]

STALL_HINT = ("usually a learning rate too high for the model and batch (the weights were thrown somewhere "
              "every later gradient is huge or non-finite from), or a sigma that under/overflowed: the events' "
              "'where' records say which latent group and side")


class StopRun(Exception):
    """A clean stop from inside the training loop; ``status`` goes to run.json."""

    status = "stopped"


class StopAtMaxSteps(StopRun):
    """Raised when --max-steps is reached."""

    def __init__(self, step, max_steps=None):
        super().__init__(step)
        self.status = f"stopped at --max-steps {max_steps if max_steps is not None else step}"


class StopStalled(StopRun):
    """Raised with --stop-when-stalled once the run is stalled."""

    def __init__(self, since: int, steps: int):
        super().__init__(since)
        self.since = since
        self.status = f"stopped: stalled since step {since} ({steps} steps in a row without an update)"


class StopNonfinite(StopRun):
    """Raised with --stop-at-nonfinite after the first step whose loss was non-finite."""

    def __init__(self, step: int):
        super().__init__(step)
        self.status = f"stopped: non-finite loss at step {step}"


class StepRecorder:
    """This process's events: a writer (given, or opened later with :meth:`open` once the rank is
    known), the ``--max-steps`` stop, stall detection, and how many steps were logged now or before."""

    def __init__(self, writer: EventWriter | None = None, max_steps: int | None = None,
                 stall_steps: int = STALL_STEPS, stop_when_stalled: bool = False, on_stall=None,
                 stop_at_nonfinite: bool = False):
        if stall_steps < 1:
            raise ValueError(f"stall_steps must be at least 1, got {stall_steps}")
        self.writer = writer
        self.max_steps = max_steps
        self.stall_steps, self.stop_when_stalled, self.on_stall = stall_steps, stop_when_stalled, on_stall
        self.stop_at_nonfinite = stop_at_nonfinite
        self.logged = 0
        self.already_logged = 0
        self.streak, self.streak_start, self.stalled_since = 0, None, None
        self.sink = None  # set by open(): the TensorBoard copy of each written step, or None
        self.model = None  # the upstream's model, set by the subclass at its first step: weights_finite() reads it

    def weights_finite(self) -> bool | None:
        """Whether every floating-point parameter and buffer of the model is finite (None before the first
        step): a run that applied a NaN step ends with NaN weights, however its last losses were logged."""
        if self.model is None:
            return None
        import torch

        tensors = [t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        return bool(all(torch.isfinite(t).all() for t in tensors))

    def open(self, path, rank: int, tensorboard=None) -> EventWriter:
        """This rank's events file; on rank 0, each written step also as TensorBoard scalars in the folder
        ``tensorboard`` when it is given and TensorBoard is installed (``vaepatch.runs.tensorboard``)."""
        self.writer = EventWriter(path, rank=rank)
        if tensorboard is not None and rank == 0:
            self.sink = _tensorboard.open_sink(tensorboard)
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def check_max_steps(self, step: int) -> None:
        """Stop cleanly before step ``step`` when ``--max-steps`` steps (0 .. max_steps-1) are done."""
        if self.max_steps is not None and step >= self.max_steps:
            raise StopAtMaxSteps(step, self.max_steps)

    def write(self, step, loss, grad_norm, skipped, reason, time, finite=None, **extra) -> bool:
        """One step's event (nothing if this rank logged the step before a restart); True if written.
        Then the stall check, which may raise :class:`StopStalled`."""
        written = False
        if self.writer is not None:
            written = self.writer.write(step=int(step), loss=loss, grad_norm=grad_norm, skipped=skipped,
                                        reason=reason, time=time, finite=finite, **extra)
            if written:
                self.logged += 1
                if self.sink is not None:
                    self.sink.write(self.writer.last)
            else:
                self.already_logged += 1
        nonfinite = finite is False or loss is None or not math.isfinite(loss)
        self._stall_check(int(step), bool(skipped) or nonfinite)
        if nonfinite and self.stop_at_nonfinite:
            raise StopNonfinite(int(step))
        return written

    def _stall_check(self, step: int, dead: bool) -> None:
        if not dead:
            self.streak, self.streak_start = 0, None
            return
        self.streak_start = step if self.streak == 0 else self.streak_start
        self.streak += 1
        if self.streak != self.stall_steps:
            return
        self.stalled_since = self.streak_start
        if self.writer is None or self.writer.rank == 0:
            print(f"vaepatch: run stalled: no update since step {self.streak_start} ({self.streak} steps in a row "
                  f"skipped or non-finite); {STALL_HINT}"
                  + ("; stopping (--stop-when-stalled)" if self.stop_when_stalled else ""), file=sys.stderr, flush=True)
        if self.on_stall is not None:
            self.on_stall(self.streak_start)
        if self.stop_when_stalled:
            raise StopStalled(self.streak_start, self.streak)
