"""Per-step events: strict JSON Lines, flushed per line, safe to share between ranks and restarts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vaepatch.runs.events import REASONS, Counts, EventLog, EventWriter, count, read

ROOT = Path(__file__).resolve().parents[1]


def _strict(line: str) -> dict:
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in {line!r}")

    return json.loads(line, parse_constant=refuse)


def _lines(path) -> list[str]:
    return Path(path).read_text().splitlines()


def _python(code: str, *args, **kwargs):
    """Run code in a fresh interpreter that imports this checkout's vaepatch."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, cwd=ROOT, **kwargs)


def _ok(step, rank=0, loss=1.0):
    return {"step": step, "rank": rank, "loss": loss, "finite": True, "grad_norm": 0.5,
            "skipped": False, "reason": None, "time": 0.1}


def test_round_trip_exact_values(tmp_path):
    path = tmp_path / "run" / "events.jsonl"  # parent directories are created
    with EventWriter(path, rank=3) as w:
        assert w.resumed_from is None
        assert w.write(7, 1.25, 0.5, False, None, 0.125) is True
        assert w.write(8, 2.5, 3.0, True, "grad", 0.25) is True
        assert w.write(9, 0.75, 1.0, True, "amp", 0.5, finite=True) is True
    log = read(path)
    assert isinstance(log, EventLog) and log.path == path
    assert log.problems == [] and log.duplicates == 0
    assert log.events == [
        {"step": 7, "rank": 3, "loss": 1.25, "finite": True, "grad_norm": 0.5, "skipped": False, "reason": None, "time": 0.125},
        {"step": 8, "rank": 3, "loss": 2.5, "finite": True, "grad_norm": 3.0, "skipped": True, "reason": "grad", "time": 0.25},
        {"step": 9, "rank": 3, "loss": 0.75, "finite": True, "grad_norm": 1.0, "skipped": True, "reason": "amp", "time": 0.5},
    ]
    assert [list(_strict(line)) for line in _lines(path)] == [
        ["step", "rank", "loss", "finite", "grad_norm", "skipped", "reason", "time"]] * 3
    assert read(tmp_path / "run").events == log.events  # a directory means its events.jsonl


def test_numpy_and_torch_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    with EventWriter(tmp_path / "events.jsonl") as w:
        w.write(np.int64(0), torch.tensor(1.5), np.float32(0.25), np.bool_(False), None, np.float64(0.5))
        w.write(1, torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(True), "nan", 0.5)
    a, b = read(tmp_path).events
    assert (a["step"], a["loss"], a["grad_norm"], a["skipped"], a["finite"]) == (0, 1.5, 0.25, False, True)
    assert (b["loss"], b["grad_norm"], b["skipped"], b["finite"], b["reason"]) == (None, None, True, False, "nan")


def test_nonfinite_written_as_null_and_file_is_strict_json(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.write(0, float("nan"), float("inf"), True, "nan", 0.1)
        w.write(1, float("-inf"), float("nan"), True, "nan", 0.1)
        w.write(2, 1.0, float("inf"), True, "amp", 0.1)
        w.write(3, float("inf"), 2.0, False, None, 0.1)  # non-finite loss without a skip
    rows = [_strict(line) for line in _lines(path)]
    assert [(r["loss"], r["grad_norm"], r["finite"]) for r in rows] == [
        (None, None, False), (None, None, False), (1.0, None, True), (None, 2.0, False)]
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_reason_validation(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        with pytest.raises(ValueError, match="reason"):
            w.write(0, 1.0, 1.0, True, None, 0.1)  # skipped without a reason
        with pytest.raises(ValueError, match="reason"):
            w.write(0, 1.0, 1.0, False, "nan", 0.1)  # a reason without a skip
        with pytest.raises(ValueError, match="reason"):
            w.write(0, 1.0, 1.0, True, "overflow", 0.1)
        assert path.read_text() == ""  # nothing written by a rejected event
        assert w.write(0, 1.0, 1.0, True, "grad", 0.1) is True  # the step is still free
    assert REASONS == (None, "nan", "grad", "amp")


def test_flushed_per_line_visible_to_other_processes(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = """
        import sys
        from vaepatch.runs.events import read
        log = read(sys.argv[1])
        print(len(log.events), len(log.problems), log.events[-1]["step"])
    """
    w = EventWriter(path, rank=1)
    try:
        for step in range(3):
            w.write(step, float(step), 1.0, False, None, 0.1)
            assert len(_lines(path)) == step + 1
            assert read(path).events[-1]["step"] == step
            out = _python(reader, path, stdout=subprocess.PIPE, text=True).communicate(timeout=60)[0]
            assert out.split() == ["%d" % (step + 1), "0", "%d" % step]
    finally:
        w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.write(9, 1.0, 1.0, False, None, 0.1)


def test_sigkill_loses_no_written_line(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = """
        import sys, time
        from vaepatch.runs.events import EventWriter
        w = EventWriter(sys.argv[1], rank=0)
        for step in range(int(sys.argv[2])):
            w.write(step, 1.0 / (step + 1), 0.5, False, None, 0.01)
        print("written", flush=True)
        time.sleep(600)
    """
    proc = _python(writer, path, 250, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    log = read(path)
    assert log.problems == [] and log.duplicates == 0
    assert [e["step"] for e in log.events] == list(range(250))
    assert log.events[-1]["loss"] == 1.0 / 250


def test_resume_skips_logged_steps_and_appends_new_ones(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path, rank=0) as w:
        for step in range(5):
            w.write(step, float(step), 1.0, False, None, 0.1)
    with EventWriter(path, rank=1) as other:  # another rank has logged nothing yet
        assert other.resumed_from is None
        other.write(0, 10.0, 1.0, False, None, 0.1)
    with EventWriter(path, rank=0) as w:  # restart from a checkpoint at step 3
        assert w.resumed_from == 4
        assert [w.write(step, 99.0, 1.0, False, None, 0.1) for step in range(3, 8)] == [False, False, True, True, True]
    log = read(path)
    assert log.duplicates == 0 and log.problems == []
    assert [(e["step"], e["rank"]) for e in log.events] == [(0, 0), (0, 1)] + [(s, 0) for s in range(1, 8)]
    assert [e["loss"] for e in log.events if e["rank"] == 0] == [0.0, 1.0, 2.0, 3.0, 4.0, 99.0, 99.0, 99.0]
    assert len(_lines(path)) == 9
    with EventWriter(path, rank=1) as other:
        assert other.resumed_from == 0


def test_two_ranks_two_processes_concurrently(tmp_path):
    path = tmp_path / "events.jsonl"
    go = tmp_path / "go"
    writer = """
        import os, sys, time
        from vaepatch.runs.events import EventWriter
        path, rank, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        w = EventWriter(path, rank=rank)
        while not os.path.exists(go):
            time.sleep(0.001)
        for step in range(n):
            w.write(step, step + rank / 10, float(rank), step % 7 == 0, "grad" if step % 7 == 0 else None, 0.001)
        w.close()
    """
    n = 2000
    procs = [_python(writer, path, rank, n, go) for rank in (0, 1)]
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0
    lines = _lines(path)
    assert len(lines) == 2 * n
    rows = [_strict(line) for line in lines]  # every line intact
    assert sorted((r["step"], r["rank"]) for r in rows) == [(s, r) for s in range(n) for r in (0, 1)]
    assert all(r["loss"] == r["step"] + r["rank"] / 10 and r["grad_norm"] == r["rank"] for r in rows)
    log = read(path)
    assert log.problems == [] and log.duplicates == 0 and len(log.events) == 2 * n
    c = count(log)
    assert (c.steps, c.ranks, c.grad_skips, c.skipped) == (n, 2, len(range(0, n, 7)), len(range(0, n, 7)))


def test_truncated_last_line_reported_and_next_writer_starts_fresh(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        for step in range(3):
            w.write(step, 1.0, 1.0, False, None, 0.1)
    with open(path, "a") as f:
        f.write('{"step": 3, "rank": 0, "loss": 0.9')  # killed mid-line
    log = read(path)
    assert [e["step"] for e in log.events] == [0, 1, 2]
    assert len(log.problems) == 1
    assert log.problems[0].startswith("events.jsonl line 4: truncated")
    assert "killed" in log.problems[0]
    with EventWriter(path) as w:
        assert w.resumed_from == 2  # the broken step 3 was not logged
        assert w.write(3, 0.9, 1.0, False, None, 0.1) is True
        assert w.write(4, 0.8, 1.0, False, None, 0.1) is True
    log = read(path)
    assert [e["step"] for e in log.events] == [0, 1, 2, 3, 4]
    assert len(log.problems) == 1 and log.problems[0].startswith("events.jsonl line 4: truncated or not JSON")
    assert _strict(_lines(path)[4])["step"] == 3  # line 5, on its own line


def test_garbage_lines_in_the_middle_reported(tmp_path):
    path = tmp_path / "events.jsonl"
    good = [json.dumps(_ok(s)) for s in range(4)]
    bad_type = dict(_ok(9), step="9")
    bad_reason = dict(_ok(10), skipped=True)  # skipped with reason None
    lines = [good[0], "not json at all", good[1], "[1, 2]", "",
             json.dumps({"step": 5, "rank": 0}), good[2], json.dumps(bad_type),
             '{"step": 11, "rank": 0, "loss": NaN, "finite": false, "grad_norm": 1.0, '
             '"skipped": true, "reason": "nan", "time": 0.1}',
             json.dumps(bad_reason), good[3]]
    path.write_text("\n".join(lines) + "\n")
    log = read(path)
    assert [e["step"] for e in log.events] == [0, 1, 2, 3, 11]  # the NaN literal is read, as Python's json writes it
    assert [p.split(":")[0] for p in log.problems] == [
        "events.jsonl line 2", "events.jsonl line 4", "events.jsonl line 6",
        "events.jsonl line 8", "events.jsonl line 10"]
    assert "not JSON" in log.problems[0] and "truncated" in log.problems[0]
    assert "not a JSON object" in log.problems[1]
    assert "missing keys" in log.problems[2] and "loss" in log.problems[2]
    assert "step" in log.problems[3]
    assert "reason" in log.problems[4]


def test_duplicates_counted_later_record_wins(tmp_path):
    path = tmp_path / "events.jsonl"
    rows = [_ok(1, loss=1.0), _ok(0, loss=0.5), _ok(1, loss=7.0), _ok(1, rank=1, loss=2.0), _ok(1, loss=8.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = read(path)
    assert log.duplicates == 2 and log.problems == []
    assert [(e["step"], e["rank"], e["loss"]) for e in log.events] == [(0, 0, 0.5), (1, 0, 8.0), (1, 1, 2.0)]


def test_missing_file_error(tmp_path):
    missing = tmp_path / "nowhere" / "events.jsonl"
    with pytest.raises(FileNotFoundError, match="no steps were logged") as info:
        read(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="--out") as info:
        read(tmp_path)  # a directory without events.jsonl
    assert str(tmp_path / "events.jsonl") in str(info.value)


def test_count_multi_rank_scenario(tmp_path):
    nan = float("nan")
    steps = {  # step: (rank 0, rank 1) as (loss, skipped, reason, finite)
        0: ((1.0, False, None, None), (3.0, False, None, None)),
        1: ((nan, True, "nan", None), (2.0, True, "grad", None)),  # nan on one rank only
        2: ((1.0, True, "grad", None), (1.0, True, "grad", None)),
        3: ((1.0, True, "amp", None), (1.0, False, None, None)),
        4: ((1.0, False, None, False), (1.0, False, None, None)),  # non-finite loss, no skip
        5: ((1.0, False, None, None), (nan, True, "nan", None)),
        6: ((2.0, False, None, None), (5.0, False, None, None)),
    }
    path = tmp_path / "events.jsonl"
    writers = [EventWriter(path, rank=r) for r in (0, 1)]
    for step in sorted(steps, reverse=True):  # order of writing does not matter
        for w, (loss, skipped, reason, finite) in zip(writers, steps[step]):
            w.write(step, loss, 1.0, skipped, reason, 0.1, finite=finite)
    for w in writers:
        w.close()
    c = count(read(path).events)
    assert c == Counts(steps=7, ranks=2, nan_steps=2, grad_skips=1, amp_skips=1, skipped=4,
                       nonfinite_loss_steps=3, first_nan_step=1, last_loss=3.5,
                       skip_streak=0, longest_skip_streak=5, longest_recovered_streak=5,  # steps 1-5 made no progress, step 6 did
                       stalled_since=None,
                       nonfinite_origins={"loss non-finite (no where record)": 3}, first_failure="step 1: loss non-finite")
    assert count(read(path)) == c  # an EventLog works too


def test_count_edge_cases():
    assert count([]) == Counts(steps=0, ranks=0, nan_steps=0, grad_skips=0, amp_skips=0, skipped=0,
                               nonfinite_loss_steps=0, first_nan_step=None, last_loss=None)
    last_all_nan = [dict(_ok(0), loss=1.0), dict(_ok(1), loss=None, finite=False, skipped=True, reason="nan")]
    c = count(last_all_nan)
    assert c.last_loss is None and c.first_nan_step == 1 and c.nonfinite_loss_steps == 1
    assert count([_ok(0, loss=4.0), _ok(0, rank=1, loss=2.0)]).last_loss == 3.0
