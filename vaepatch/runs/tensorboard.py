"""Per-step events as TensorBoard scalars: live from ``vaepatch run``, or exported from finished runs.

NVAE and Efficient-VDVAE users watch runs in TensorBoard; this puts what ``events.jsonl`` records
beside their curves: each step's loss, its KL and reconstruction parts, gradient norm and step time,
the cumulative skipped updates by reason and non-finite losses, each side's log sigma range, and a
failing step's one-line provenance as text. :class:`Steps` turns one event record (as
``vaepatch.runs.events.read`` gives it) into those values; :class:`Sink` writes them, live (the step
recorder calls it) or in :func:`export` (``vaepatch compare RUNS --tensorboard DIR``), so the two
paths write the same thing.

TensorBoard is optional (``pip install "vaepatch[tensorboard]"``) and imported only when a sink
opens: without it nothing is written and nothing changes. One rank writes (rank 0): TensorBoard has
no notion of ranks, and the skip decisions are the same on every rank.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

from vaepatch.runs import events as _events
from vaepatch.runs import provenance as _provenance

__all__ = ["INSTALL", "SCALARS", "TEXT", "available", "Steps", "Sink", "open_sink", "export", "export_runs"]

INSTALL = 'pip install "vaepatch[tensorboard]"'
PREFIX = "vaepatch/"
# Cumulative counts, named as everywhere else in vaepatch (docs/run-logs.md, "One word per concept").
COUNTS = ("skipped", "nan_steps", "grad_skips", "amp_skips", "nonfinite_loss_steps")
LOG_SIGMA = tuple(f"log_sigma/{side}_{end}" for side in _provenance.SIDES for end in ("min", "max"))
# Every tag each step gets (NaN where the step has no value: a non-finite loss, no scale record).
SCALARS = tuple(PREFIX + name for name in ("loss", "kl", "recon", "grad_norm", "step_time", *COUNTS, *LOG_SIGMA))
TEXT = PREFIX + "failure"  # a failing step's provenance; TensorBoard lists it as "vaepatch/failure/text_summary"
FILE_SUFFIX = ".vaepatch"  # our event files, told apart from an upstream's in the same folder


def available() -> bool:
    """Whether the tensorboard package is installed (it is not imported here)."""
    return importlib.util.find_spec("tensorboard") is not None


def _number(x) -> float:
    return math.nan if x is None else float(x)


class Steps:
    """Turns one rank's events, in step order, into tag -> value, keeping the running counts."""

    def __init__(self):
        self.counts = dict.fromkeys(COUNTS, 0)

    def scalars(self, event: dict) -> dict:
        """This step's value for every tag in :data:`SCALARS`."""
        reason = event["reason"]
        self.counts["skipped"] += bool(event["skipped"])
        self.counts["nan_steps"] += reason == "nan"
        self.counts["grad_skips"] += reason == "grad"
        self.counts["amp_skips"] += reason == "amp"
        self.counts["nonfinite_loss_steps"] += not event["finite"]
        values = {"loss": event["loss"], "kl": event.get("kl"), "recon": event.get("recon"),
                  "grad_norm": event["grad_norm"], "step_time": event["time"], **self.counts}
        scale = event.get("scale") or {}
        for side in _provenance.SIDES:
            low, high = (scale.get(side) or {}).get("log_sigma") or (None, None)
            values[f"log_sigma/{side}_min"], values[f"log_sigma/{side}_max"] = low, high
        return {PREFIX + name: _number(value) for name, value in values.items()}

    @staticmethod
    def text(event: dict) -> str | None:
        """A failing (skipped or non-finite) step's provenance as markdown, else None."""
        if event["finite"] and not event["skipped"]:
            return None
        text = _provenance.describe(event)
        if event.get("where"):  # the whole record, as an indented (code) block
            text += "\n\n" + "\n".join("    " + line for line in json.dumps(event["where"], indent=1).splitlines())
        return text


class Sink:
    """One event file of TensorBoard summaries in ``logdir``: :meth:`write` one step's event.

    Flushed after every step, so a killed run loses nothing it wrote (0.2 ms a step on a busy 2-core CPU)."""

    def __init__(self, logdir):
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._pb = event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
        self._text_metadata = text_metadata.create_summary_metadata(display_name=TEXT, description="")
        self.logdir = Path(logdir)
        self._file = EventFileWriter(str(self.logdir), filename_suffix=FILE_SUFFIX)
        self.steps = Steps()

    def write(self, event: dict, wall_time: float | None = None) -> None:
        """Every scalar of ``event`` (one record of events.jsonl) at its step, and its failure text."""
        event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2 = self._pb
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in self.steps.scalars(event).items()]
        text = self.steps.text(event)
        if text is not None:
            tensor = tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                                            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
            values.append(summary_pb2.Summary.Value(tag=TEXT + "/text_summary", metadata=self._text_metadata,
                                                    tensor=tensor))
        self._file.add_event(event_pb2.Event(wall_time=time.time() if wall_time is None else wall_time,
                                             step=int(event["step"]), summary=summary_pb2.Summary(value=values)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def open_sink(logdir) -> Sink | None:
    """A :class:`Sink` in ``logdir``, or None without TensorBoard installed (or with a broken install,
    said in one line: the run goes on without it)."""
    if not available():
        return None
    try:
        return Sink(logdir)
    except ImportError as e:
        print(f"vaepatch: TensorBoard is installed but does not import ({e}); no TensorBoard files for this run. "
              f"Reinstall it: {INSTALL}", file=sys.stderr, flush=True)
        return None


def _started(run_dir: Path) -> float:
    """When the run started (run.json), as a timestamp; 0 when unknown."""
    try:
        return datetime.datetime.fromisoformat(json.loads((run_dir / "run.json").read_text())["started"]).timestamp()
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def export(run_dir, logdir) -> int:
    """Write one finished run's events (its lowest rank's, as the live path writes rank 0's) to
    ``logdir``; the wall time of a step is the run's start plus the step times before it. Returns
    the number of steps written."""
    run_dir = Path(run_dir)
    log = _events.read(run_dir)
    rank = min((e["rank"] for e in log.events), default=0)
    sink, clock = Sink(logdir), _started(run_dir)
    try:
        written = 0
        for event in log.events:
            if event["rank"] == rank:
                clock += event["time"]
                sink.write(event, wall_time=clock)
                written += 1
    finally:
        sink.close()
    return written


def _folder(run: Path, roots: list[Path]) -> Path:
    """The run's path under the root it was found in (a root that is itself a run: its name)."""
    for root in roots:
        if run == root:
            return Path(root.resolve().name)
        if root in run.parents:
            return run.relative_to(root)
    return Path(run.name)


def export_runs(runs, roots, dest) -> list[tuple[Path, Path, int]]:
    """Export each run (a run directory found under ``roots``) to its own folder under ``dest``, laid out
    as under its root, so a grid stays browsable. Returns (run, folder, steps) per run with events.

    Raises ValueError, before writing anything, when two runs would share a folder or a folder
    already holds TensorBoard files (TensorBoard would show both copies)."""
    if not available():
        raise RuntimeError(f"--tensorboard needs TensorBoard, which is not installed. run: {INSTALL}")
    roots, dest = [Path(r) for r in roots], Path(dest)
    plan, seen = [], {}
    for run in map(Path, runs):
        if not (run / _events.FILENAME).is_file():
            continue  # no per-step events (an upstream log alone): nothing to export
        folder = dest / _folder(run, roots)
        if folder in seen:
            raise ValueError(f"{seen[folder]} and {run} would both export to {folder}; "
                             "export them in separate calls, each with its own --tensorboard folder")
        if folder.is_dir() and any(folder.glob("events.out.tfevents.*")):
            raise ValueError(f"{folder} already holds TensorBoard event files (an earlier export?): TensorBoard "
                             "would show both copies. Give an empty --tensorboard folder, or remove the old one")
        seen[folder] = run
        plan.append((run, folder))
    return [(run, folder, export(run, folder)) for run, folder in plan]
