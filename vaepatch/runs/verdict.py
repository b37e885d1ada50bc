"""Did a run train? Judged by where it ends, the way its upstream trains it, not by its worst step.

A step the upstream does not apply is counted, never a failure by itself: openai/vdvae skips every
step whose loss is NaN (with or without its gradient-norm rule) and trains on, and NVAE's AMP
GradScaler skips a step whose gradients are not finite (the paper's vanilla VDVAE had 13 ± 3 NaN
steps over a full run and finished). A run **fails** when it can no longer train:

- it stalled: ``stall_steps`` steps in a row without an update (``"stalled"``; the launcher's
  ``--stop-when-stalled`` stops it there), or
- most of its last 10% of steps were not applied (``"mostly skipped"``: a run that NaNs on 96% of its
  steps is not training, whatever its finite steps say), or
- its weights were not finite when it ended (``"non-finite weights"``: an upstream that applied a NaN
  step, as NVAE without its grad scaler does), or
- it did not end trained: its end NELBO (the median over its last 10% of steps) is not below its first
  step's (``"untrained"``), or it crashed, or stopped before its last step (``"incomplete"``). The
  median, not the mean: one spike of 10^16 among the last 100 steps of a run that is back at its
  trained loss the step after would otherwise decide the verdict; a run ruined for more than half of
  its last 10% fails.

A run that was stopped at its first non-finite loss (``--stop-at-nonfinite``, an opt-in for smoke
runs) is ``"non-finite"``: it never got the chance to go on, so it cannot pass.

The NELBO is recon + KL, unweighted (:func:`nelbo`): NVAE's logged loss anneals the KL's weight from
~0 over the first 30% of a run, so the logged loss itself rises while the model improves.

A **spike** (a finite NELBO above ``SPIKE_FACTOR`` times the median of the ``SPIKE_WINDOW`` finite
values before it) is counted and reported, never a failure by itself: on the real VDVAE without its
skip rule, patched runs spike to 10^6 right after the learning-rate warm-up and then train on to a
lower loss than before the spike. NaN steps, high-gradient and AMP skips are counted the same way.

The same words are used by ``vaepatch compare`` and the stability-margin and Table 4 benches (docs: run logs).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from vaepatch.runs import events as _events
from vaepatch.runs import manifest as _manifest

__all__ = ["END_FRACTION", "MOSTLY_SKIPPED", "SPIKE_FACTOR", "SPIKE_WINDOW", "VERDICTS", "nelbo", "curve",
           "end_loss", "spikes", "applied_share", "judge", "judge_dir"]

END_FRACTION = 0.1  # the end of a run: its last 10% of steps
SPIKE_FACTOR = 10.0  # a spike: a loss above 10x the running median ...
SPIKE_WINDOW = 50  # ... of the 50 finite losses before it
SPIKE_MIN_HISTORY = 5  # no spike is called before this many finite losses
MOSTLY_SKIPPED = 0.5  # a run fails when more than this share of its last 10% of steps was not applied
VERDICTS = ("passed", "stalled", "mostly skipped", "non-finite weights", "untrained", "crashed", "incomplete",
            "non-finite", "not run")


def nelbo(event: dict) -> float | None:
    """The step's negative ELBO: ``recon + kl`` where the event carries both parts (NVAE's logged loss
    weighs its KL by an annealing coefficient and adds regularizers), else the logged loss (a loss the
    upstream logs as its NELBO, as VDVAE does). None where it is not finite."""
    if not event["finite"] or event["loss"] is None:
        return None
    kl, recon = event.get("kl"), event.get("recon")
    if isinstance(kl, (int, float)) and isinstance(recon, (int, float)):
        value = kl + recon
        return value if math.isfinite(value) else None
    return event["loss"]


def _loss(event: dict) -> float | None:
    return event["loss"] if event["finite"] and event["loss"] is not None else None


def curve(events: list[dict], value=_loss) -> list:
    """One point per step, ``(step, value or None, skipped)``: the mean over ranks of ``value(event)``
    (default the logged loss; :func:`nelbo` for the verdict), and whether any rank skipped the update."""
    by_step: dict[int, list[dict]] = {}
    for e in events:
        by_step.setdefault(e["step"], []).append(e)
    points = []
    for step in sorted(by_step):
        losses = [v for v in map(value, by_step[step]) if v is not None]
        points.append((step, statistics.fmean(losses) if losses else None, any(e["skipped"] for e in by_step[step])))
    return points


def end_loss(points: list, average=statistics.fmean) -> float | None:
    """``average`` (default the mean) of the finite values over the last ``END_FRACTION`` of the curve's
    steps (at least one step)."""
    if not points:
        return None
    tail = points[-max(1, math.ceil(len(points) * END_FRACTION)):]
    losses = [loss for _, loss, _ in tail if loss is not None]
    return average(losses) if losses else None


def spikes(points: list, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW) -> dict:
    """``{"count", "max_ratio", "max_step"}``: steps whose loss exceeded ``factor`` x the median of
    the ``window`` finite losses before it (a spike does not enter the later medians' history)."""
    history: list[float] = []
    count, worst = 0, (None, None)
    for step, loss, _ in points:
        if loss is None:
            continue
        if len(history) >= SPIKE_MIN_HISTORY:
            median = statistics.median(history[-window:])
            if median > 0 and loss > factor * median:
                count += 1
                ratio = loss / median
                if worst[0] is None or ratio > worst[0]:
                    worst = (ratio, step)
                continue
        history.append(loss)
    return {"count": count, "max_ratio": worst[0], "max_step": worst[1]}


def applied_share(points: list) -> float | None:
    """The share of the curve's steps whose update was applied (not skipped on any rank), or None."""
    return sum(not skipped for _, _, skipped in points) / len(points) if points else None


def _tail(points: list) -> list:
    return points[-max(1, math.ceil(len(points) * END_FRACTION)):] if points else []


def judge(log: list[dict], status: str, steps: int, stalled: bool = False, weights_finite: bool | None = None) -> dict:
    """The verdict on one run from its events, its run.json status (and ``weights_finite``, where the
    launcher recorded it) and the steps it was asked for."""
    points = curve(log, nelbo)
    counts = _events.count(log)
    first = next((loss for _, loss, _ in points if loss is not None), None)
    end = end_loss(points, statistics.median)  # a spike in the last 10% that the run recovers from does not decide
    stalled = stalled or status.startswith("stopped: stalled")
    last_step = points[-1][0] if points else -1
    end_applied = applied_share(_tail(points))
    if status in ("missing", "running"):  # never started, or still going (or killed: run.json never said it ended)
        verdict = "not run"
    elif status.startswith("stopped: non-finite"):  # --stop-at-nonfinite: the opt-in shortcut
        verdict = "non-finite"
    elif status.startswith("crashed"):
        verdict = "crashed"
    elif stalled:
        verdict = "stalled"
    elif weights_finite is False:
        verdict = "non-finite weights"
    elif last_step < steps - 1:
        verdict = "incomplete"
    elif end_applied is not None and end_applied < 1 - MOSTLY_SKIPPED:
        verdict = "mostly skipped"
    elif end is None or first is None or not end < first:
        verdict = "untrained"
    else:
        verdict = "passed"
    return {"verdict": verdict, "passed": verdict == "passed", "steps": counts.steps, "first_nelbo": first,
            "end_nelbo": end, "nonfinite_loss_steps": counts.nonfinite_loss_steps, "nan_steps": counts.nan_steps,
            "grad_skips": counts.grad_skips, "amp_skips": counts.amp_skips, "skipped": counts.skipped,
            "applied_share": applied_share(points), "end_applied_share": end_applied,
            "weights_finite": weights_finite,
            "skip_streak": counts.skip_streak, "longest_skip_streak": counts.longest_skip_streak,
            "first_nonfinite_loss_step": next((e["step"] for e in log if not e["finite"]), None),
            "spikes": spikes(points), "first_failure": counts.first_failure,
            "nonfinite_origins": counts.nonfinite_origins}


def judge_dir(run_dir, steps: int) -> dict:
    """:func:`judge` on a run folder (``run.json`` + ``events.jsonl``); a folder without them, or whose
    run.json does not say the run ended, is "not run". Beside the verdict: the run's own wall time
    (``wall_seconds``, from run.json's start and end) and what it ran on (``machine``)."""
    run_dir = Path(run_dir)
    manifest = _manifest.read(run_dir / _manifest.FILENAME) or {}
    try:
        log = _events.read(run_dir).events
    except FileNotFoundError:
        log = []
    status = manifest.get("status", "missing")
    return {"run": str(run_dir), "status": status,
            **judge(log, status, steps, stalled=manifest.get("stalled_since") is not None,
                    weights_finite=manifest.get("weights_finite")),
            "wall_seconds": _manifest.wall_seconds(manifest), "machine": manifest.get("machine"),
            "vaepatch_commit": manifest.get("vaepatch_commit"), "upstream_commit": manifest.get("upstream_commit")}
