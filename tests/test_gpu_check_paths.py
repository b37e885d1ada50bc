"""The GPU check's paths that need no GPU, no clone and no torch step: the archive's log truncation, the
fused / eager summary, a launcher run stopped at its time, and stopping a process group that ignores SIGTERM.
Tiny ``python -c`` subprocesses, a few seconds each."""
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from vaepatch.bench import gpu
from vaepatch.bench.gpu import runs as gpu_runs
from vaepatch.bench.gpu.sections import fuse_summary

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="SKIPPED, reads process states in /proc")


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (killed, waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the archive: what goes in, and a log's tail only ----------------------------------------------
def test_archive_keeps_runs_parts_and_the_tail_of_a_long_log(tmp_path):
    work, dest = tmp_path / "work", tmp_path / "out" / "runs.tar.gz"
    files = {"runs/a/run.json": b'{"status": "x"}', "runs/a/events.jsonl": b'{"step": 0}\n',
             "runs/a/nvae/eval-t/log.txt": b"train_nelbo 1.0\n", "parts/ou-cost.json": b"{}",
             "logs/small.log": b"short log\n", "logs/big.log": b"".join(b"line %05d\n" % i for i in range(100)),
             "runs/a/checkpoint.pt": b"weights", "data/cifar/data_batch_1": b"pixels"}  # the last two stay out
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    dest.parent.mkdir()
    gpu.archive(work, dest, max_log_bytes=35)
    with tarfile.open(dest) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(got) == set(files) - {"runs/a/checkpoint.pt", "data/cifar/data_batch_1"}
    assert got["logs/big.log"] == b"line 00096\nline 00097\nline 00098\nline 00099\n"[-35:]  # its last 35 bytes
    assert got["logs/small.log"] == b"short log\n" and got["runs/a/events.jsonl"] == b'{"step": 0}\n'
    assert [p.name for p in dest.parent.iterdir()] == ["runs.tar.gz"]  # no temporary file left beside it


# -- VDVAE step time: eager vs fused --------------------------------------------------------------
def test_fuse_summary_pairs_each_variants_eager_and_fused_rows():
    rows = [{"variant": "upbounded1", "fuse": False, "vanilla_s": 0.100, "patched_s": 0.120, "ratio": 1.20},
            {"variant": "upbounded1", "fuse": True, "vanilla_s": 0.100, "patched_s": 0.090, "ratio": 0.90},
            {"variant": "explin-cst1", "fuse": False, "vanilla_s": 0.100, "patched_s": 0.105, "ratio": 1.05},
            {"variant": "explin-cst1", "fuse": True, "vanilla_s": 0.100, "patched_s": 0.210, "ratio": 2.10},
            {"variant": "eager-only", "fuse": False, "vanilla_s": 0.1, "patched_s": 0.1, "ratio": 1.0},
            {"variant": "fused-failed", "fuse": False, "vanilla_s": 0.1, "patched_s": 0.1, "ratio": 1.0},
            {"variant": "fused-failed", "fuse": True, "error": "RuntimeError: boom"}]
    summary = fuse_summary(rows)
    assert list(summary) == ["upbounded1", "explin-cst1"]  # a variant needs both rows, neither failed
    up, ex = summary["upbounded1"], summary["explin-cst1"]
    assert (up["eager_ratio"], up["fused_ratio"], up["fused_wins"]) == (1.20, 0.90, True)
    assert up["fused_over_eager_patched"] == pytest.approx(0.75)  # 0.090 / 0.120
    assert (ex["eager_ratio"], ex["fused_ratio"], ex["fused_wins"]) == (1.05, 2.10, False)
    assert ex["fused_over_eager_patched"] == pytest.approx(2.0)  # 0.210 / 0.105
    assert fuse_summary([]) == {}


# -- a launcher run past its time ------------------------------------------------------------------
def test_run_logged_stops_a_run_at_its_time_and_keeps_its_log(tmp_path):
    log = tmp_path / "logs" / "slow.log"
    code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
    t0 = time.monotonic()
    result = gpu_runs.run_logged([sys.executable, "-c", code], log, timeout=2)
    took = time.monotonic() - t0
    text = log.read_text()
    pid = int(text.split("pid ", 1)[1].split()[0])
    try:
        assert result["returncode"] is None and result["error"] == "stopped after 2 s (the section's time)"
        assert 2 <= result["seconds"] <= round(took, 2) + 0.01 and took < 5  # (seconds: rounded to 0.01)
        assert not _alive(pid)  # stopped (SIGTERM) and reaped, not left running
        assert text.startswith(f"$ {sys.executable} -c import os") and result["log_tail"] == text
    finally:
        _kill(pid)


def test_run_logged_of_a_run_that_ends_in_time(tmp_path):
    log = tmp_path / "ok.log"
    done = gpu_runs.run_logged([sys.executable, "-c", "print('fine')"], log, timeout=5)
    assert done["returncode"] == 0 and "log_tail" not in done and "error" not in done
    failed = gpu_runs.run_logged([sys.executable, "-c", "import sys; print('bad'); sys.exit(3)"], log, timeout=5)
    assert failed["returncode"] == 3 and failed["log_tail"].endswith("bad\n") and "error" not in failed
    assert log.read_text().count("$ ") == 2  # appended, one command line each


# -- stopping: SIGTERM, then SIGKILL ---------------------------------------------------------------
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # same process group
    print(child.pid, flush=True)
    time.sleep(60)
""")


def _stubborn(group: bool):
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True,
                            preexec_fn=os.setpgrp if group else None)
    child = int(proc.stdout.readline())  # SIGTERM is ignored from here on
    return proc, child


@pytest.mark.parametrize("group", [True, False])
def test_stop_kills_a_process_that_ignores_sigterm(group):
    proc, child = _stubborn(group)
    try:
        t0 = time.monotonic()
        gpu_runs.stop(proc, grace=1.0, group=group)
        took = time.monotonic() - t0
        assert proc.returncode == -signal.SIGKILL, proc.returncode  # SIGTERM was ignored: SIGKILL ended it
        assert 1.0 <= took < 4.0  # after the grace, not before
        if group:  # the whole group goes: what the section started too
            assert _gone(child)
        else:
            assert _alive(child)  # only the process itself was signalled
    finally:
        proc.kill()
        proc.wait()
        _kill(child)
        proc.stdout.close()


def test_stop_of_a_process_that_obeys_sigterm_or_is_gone_returns_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "import time; print(1, flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, preexec_fn=os.setpgrp)
    proc.stdout.readline()
    t0 = time.monotonic()
    gpu_runs.stop(proc, grace=5.0)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t0 < 3.0
    gpu_runs.stop(proc, grace=5.0)  # already reaped: nothing to signal, no error
    proc.stdout.close()
