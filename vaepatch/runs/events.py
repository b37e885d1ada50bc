"""Per-step training events as JSON Lines: the exact record launchers write and reports read.

One line per (step, rank), written with a single ``os.write`` on an ``O_APPEND``
descriptor, so several MPI ranks can share one file, every line is on disk as soon
as ``write`` returns, and a killed process loses nothing it already wrote.

    with EventWriter("runs/x/events.jsonl", rank=rank) as events:
        events.write(step, loss, grad_norm, skipped, reason, time)
    log = read("runs/x")          # events sorted by (step, rank), plus problems
    counts = count(log.events)    # nan steps, skips, last loss...

Records are strict JSON: a non-finite loss or grad norm is written as ``null``. Lines that spell
a non-finite number the way Python's ``json`` does (``NaN``, ``Infinity``; VDVAE's own logger writes
them) are read and counted like ``null``, never dropped. Besides the contract's keys, an event may
carry more (readers ignore what they don't know): ``kl`` and ``recon`` (this rank's parts of the
loss), ``nonfinite`` (which of them went non-finite) and, on a failing step, ``where``
(``vaepatch.runs.provenance``).
"""
from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

from vaepatch.runs import provenance

FILENAME = "events.jsonl"
# Why an update was skipped: None (not skipped), non-finite loss, gradient-norm
# threshold, or the AMP grad scaler found inf/nan gradients.
REASONS = (None, "nan", "grad", "amp")
_KILLED = "the process was probably killed while writing"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number_or_null(x) -> bool:
    return x is None or _is_number(x)


# The record, once: each key in file order with the check its value must pass.
SCHEMA = {
    "step": _is_int, "rank": _is_int, "loss": _number_or_null, "finite": lambda v: isinstance(v, bool),
    "grad_norm": _number_or_null, "skipped": lambda v: isinstance(v, bool), "reason": lambda v: v in REASONS,
    "time": _is_number,
}
KEYS = tuple(SCHEMA)
_FLOATS = ("loss", "grad_norm", "time")
# A run whose last STALL_STEPS steps were all skipped (or had a non-finite loss, which NVAE applies
# without --skip-nonfinite) is stalled: dead, as in openai/vdvae#25. README: "what stalled means".
STALL_STEPS = 200


def _finite_or_none(x) -> float | None:
    """JSON has no NaN/Infinity: a non-finite value becomes null."""
    if x is None:
        return None
    x = float(x)  # numpy and torch scalars too
    return x if math.isfinite(x) else None


def _check_reason(skipped: bool, reason) -> None:
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
    if skipped and reason is None:
        raise ValueError("reason must say why the update was skipped (skipped is true, reason is None)")
    if not skipped and reason is not None:
        raise ValueError(f"reason must be None when skipped is false, got {reason!r}")


def strict(value):
    """``value`` with every non-finite float (at any depth) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


_strict = strict  # its former private name


def _record(text: str) -> tuple[dict | None, str | None]:
    """Parse one line into a validated record, or say what is wrong with it."""
    try:
        obj = json.loads(text)  # NaN / Infinity literals too: read like null below
    except ValueError as e:
        return None, f"truncated or not JSON ({e}) — {_KILLED}"
    if not isinstance(obj, dict):
        return None, f"not a JSON object ({type(obj).__name__})"
    missing = [k for k in KEYS if k not in obj]
    if missing:
        return None, f"missing keys {missing}"
    bad = [k for k, ok in SCHEMA.items() if not ok(obj[k])]
    if bad:
        return None, "wrong type for " + ", ".join(f"{k}={obj[k]!r}" for k in bad)
    try:
        _check_reason(obj["skipped"], obj["reason"])
    except ValueError as e:
        return None, str(e)
    if not math.isfinite(obj["time"]):
        return None, f"time must be finite, got {obj['time']!r}"
    for k in _FLOATS:
        if obj[k] is not None:
            obj[k] = float(obj[k])
    if obj["loss"] is not None and not math.isfinite(obj["loss"]):  # a NaN/Infinity literal: a non-finite loss
        obj["loss"], obj["finite"] = None, False
    if obj["grad_norm"] is not None and not math.isfinite(obj["grad_norm"]):
        obj["grad_norm"] = None
    return obj, None


def _parse(path: Path) -> tuple[list[dict], list[str], bool]:
    """All valid records in file order, the problems, and whether the file ends mid-line."""
    data = path.read_bytes()
    lines = data.decode("utf-8", errors="replace").split("\n")
    ends_mid_line = bool(data) and not data.endswith(b"\n")
    records, problems = [], []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        obj, problem = _record(text)
        if obj is not None:
            records.append(obj)
            continue
        if number == len(lines) and ends_mid_line:
            problem = f"truncated last line (no trailing newline): {problem}"
        problems.append(f"{path.name} line {number}: {problem}")
    return records, problems, ends_mid_line


class EventWriter:
    """Appends this rank's per-step events to a JSON Lines file shared by all ranks.

    Steps this rank already logged (a restart from a checkpoint) are not written
    again: ``write`` returns False for them.
    """

    def __init__(self, path, rank: int = 0):
        self.path = Path(path)
        self.rank = operator.index(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        records, _, ends_mid_line = _parse(self.path)
        self._logged = {r["step"] for r in records if r["rank"] == self.rank}
        self.resumed_from = max(self._logged) if self._logged else None
        self.last = None
        if ends_mid_line:  # a killed writer left half a line: start ours on a fresh one
            os.write(self._fd, b"\n")

    def write(self, step, loss, grad_norm, skipped, reason, time, finite=None, **extra) -> bool:
        """Append one event; False (nothing written) if this rank already logged the step. ``extra``
        keys (kl, recon, nonfinite, where...) follow the contract's, non-finite numbers as null."""
        if self._fd is None:
            raise ValueError(f"EventWriter for {self.path} is closed")
        skipped = bool(skipped)
        _check_reason(skipped, reason)
        step = operator.index(step)
        time = float(time)
        if not math.isfinite(time):
            raise ValueError(f"time must be finite, got {time!r}")
        if step in self._logged:
            return False
        loss = _finite_or_none(loss)
        values = dict(step=step, rank=self.rank, loss=loss, finite=loss is not None if finite is None else bool(finite),
                      grad_norm=_finite_or_none(grad_norm), skipped=skipped, reason=reason, time=time)
        event = {key: values[key] for key in KEYS}
        event.update((k, _strict(v)) for k, v in extra.items() if k not in event and v is not None)
        line = (json.dumps(event, allow_nan=False) + "\n").encode()
        written = os.write(self._fd, line)  # one call: the line lands whole, never interleaved
        if written != len(line):
            raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes (disk full?)")
        self._logged.add(step)
        self.last = event  # the record as written (a TensorBoard sink reads it)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class EventLog:
    """What a file holds: valid events sorted by (step, rank), and every line that was not one."""

    path: Path
    events: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duplicates: int = 0


def read(path) -> EventLog:
    """Read an events file (or a directory's events.jsonl); content problems are reported, not raised."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no events file, so no steps were logged there "
            "(the run never reached its first step, or this is the wrong --out directory)"
        )
    records, problems, _ = _parse(path)
    latest = {}
    for r in records:  # a step logged twice (a log written by other tools on resume): the later record wins
        latest[(r["step"], r["rank"])] = r
    events = sorted(latest.values(), key=lambda r: (r["step"], r["rank"]))
    return EventLog(path, events, problems, len(records) - len(events))


@dataclass
class Counts:
    """Per-step tallies; a step counts once however many ranks saw the event."""

    steps: int = 0
    ranks: int = 0
    nan_steps: int = 0
    grad_skips: int = 0
    amp_skips: int = 0
    skipped: int = 0
    nonfinite_loss_steps: int = 0
    first_nan_step: int | None = None
    last_loss: float | None = None
    skip_streak: int = 0  # steps at the end of the log, in a row, whose update was skipped or whose loss was non-finite
    longest_skip_streak: int = 0
    longest_recovered_streak: int = 0  # the longest streak that an update ended: how long a run came back from
    stalled_since: int | None = None  # first step of the final streak when it is >= stall_steps
    # "kl non-finite at block 3 (8x8): prior sigma underflow" -> steps
    nonfinite_origins: dict = field(default_factory=dict)
    first_failure: str | None = None  # the first non-finite or skipped step, in one line


def _streaks(skipped_by_step: dict) -> tuple[int, int, int | None, int]:
    """(trailing streak, longest streak, first step of the trailing streak, longest streak an update
    ended) of skipped steps."""
    longest = run = recovered = 0
    start = None
    for step in sorted(skipped_by_step):
        if skipped_by_step[step]:
            start = step if run == 0 else start
            run += 1
            longest = max(longest, run)
        else:
            recovered = max(recovered, run)
            run, start = 0, None
    return run, longest, start, recovered


def _failure_key(event: dict) -> str:
    parts = "+".join(event.get("nonfinite") or []) or "loss"
    where = event.get("where")
    return f"{parts} non-finite at {provenance.origin(where)}" if where else f"{parts} non-finite (no where record)"


def count(events, stall_steps: int = STALL_STEPS) -> Counts:
    """Tally events (a list of records, or an EventLog); counts come from these events only."""
    events = list(getattr(events, "events", events))
    if not events:
        return Counts()
    reasons: dict[int, set] = {}
    by_step: dict[int, list] = {}
    for e in events:
        reasons.setdefault(e["step"], set()).add(e["reason"])
        by_step.setdefault(e["step"], []).append(e)
    nan = {s for s, r in reasons.items() if "nan" in r}
    last = max(reasons)
    last_losses = [e["loss"] for e in events if e["step"] == last and e["finite"] and e["loss"] is not None]
    trailing, longest, start, recovered = _streaks({s: any(e["skipped"] or not e["finite"] for e in es)
                                                    for s, es in by_step.items()})
    origins: dict[str, int] = {}
    first_failure = None
    for step in sorted(by_step):
        ranks = by_step[step]
        bad = [e for e in ranks if not e["finite"]]
        if bad:
            witness = next((e for e in bad if e.get("where")), bad[0])
            key = _failure_key(witness)
            origins[key] = origins.get(key, 0) + 1
        if first_failure is None and (bad or any(e["skipped"] for e in ranks)):
            witness = next((e for e in bad + ranks if e.get("where")), (bad + ranks)[0])
            first_failure = provenance.describe(witness)
    return Counts(
        steps=len(reasons),
        ranks=len({e["rank"] for e in events}),
        nan_steps=len(nan),
        grad_skips=sum(1 for s, r in reasons.items() if "grad" in r and s not in nan),
        amp_skips=sum(1 for s, r in reasons.items() if "amp" in r and s not in nan),
        skipped=len({e["step"] for e in events if e["skipped"]}),
        nonfinite_loss_steps=len({e["step"] for e in events if not e["finite"]}),
        first_nan_step=min(nan) if nan else None,
        last_loss=sum(last_losses) / len(last_losses) if last_losses else None,
        skip_streak=trailing, longest_skip_streak=longest, longest_recovered_streak=recovered,
        stalled_since=start if trailing >= stall_steps else None,
        nonfinite_origins=origins, first_failure=first_failure,
    )
