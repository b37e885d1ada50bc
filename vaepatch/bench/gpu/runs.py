"""The GPU check's launcher runs: ``vaepatch run vdvae`` / ``vaepatch run nvae`` as subprocesses, and what
their run directories say (run.json, and every count from events.jsonl, never from the upstream's logs).

NVAE's cifar10 loader is torchvision's ``CIFAR10(download=True)``, which checks the files' md5 sums and
downloads the real CIFAR-10 when they do not match. The check's data are ``vaepatch make-data`` crops in
CIFAR-10's exact format (the GPU machine has no network, and the real set is larger than what travels
with the tree), so they never match: ``python -m vaepatch.bench.gpu.runs run-nvae ARGS`` is
``vaepatch run nvae ARGS`` with torchvision's ``CIFAR10`` replaced by vaepatch's reader of those files
(the one the ``torchvision-stub-nvae`` shim gives a machine without torchvision). Nothing else differs.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest
from vaepatch.runs.prerun import free_port

__all__ = ["make_data", "free_port", "vdvae_command", "nvae_command", "run_logged", "stop", "check_run", "main"]

LOG_TAIL = 3000  # characters of a failed command's output kept in the report


def make_data(dest: Path, target: str, n_train: int, n_test: int) -> Path:
    """A CIFAR-format dataset of natural crops under ``dest`` (made once; reused when it is there)."""
    from vaepatch import cifar_format

    marker = dest / f".made-{n_train}-{n_test}"
    if not marker.exists():
        cifar_format.make(dest, n_train=n_train, n_test=n_test, for_target=target)
        marker.write_text("")
    return dest


def vdvae_command(python: str, out: Path, data: Path, variant: str, steps: int, port: int, cpu: bool,
                  train_args: list, mpiexec: str | None) -> list:
    """``[mpiexec -n 1] python -m vaepatch run vdvae ...`` for ``steps`` steps of ``train_args``."""
    launcher = [mpiexec, "-n", "1"] if mpiexec else []
    return [*launcher, python, "-m", "vaepatch", "run", "vdvae", "--variant", variant, "--out", str(out),
            "--max-steps", str(steps), *(["--cpu"] if cpu else []), "--",
            *train_args, "--iters_per_print", "10", "--iters_per_images", "1000000", "--data_root", str(data),
            "--save_dir", str(out / "vdvae"), "--desc", "check", "--port", str(port)]


def nvae_command(python: str, out: Path, data: Path, variant: str, steps: int, port: int, cpu: bool,
                 train_args: list, batch: int, lr: float | None = None) -> list:
    """``vaepatch run nvae`` (through :func:`main`'s offline CIFAR-10 reader) for ``steps`` steps, one process."""
    lr_args = ["--learning_rate", repr(lr)] if lr is not None else []
    return [python, "-m", "vaepatch.bench.gpu.runs", "run-nvae", "--variant", variant, "--out", str(out),
            "--max-steps", str(steps), "--master-port", str(port), *(["--cpu"] if cpu else []), "--",
            "--dataset", "cifar10", *train_args, "--batch_size", str(batch), *lr_args, "--warmup_epochs", "0",
            "--epochs", "1", "--num_process_per_node", "1", "--seed", "0", "--data", str(data),
            "--root", str(out / "nvae"), "--save", "check"]


def run_logged(command: list, log: Path, timeout: float, env=None) -> dict:
    """Run ``command`` with its output to ``log``; stopped (:func:`stop`) at ``timeout`` seconds.
    It stays in the caller's process group, so stopping a whole section stops it too. Returns
    ``returncode`` (None if stopped), ``seconds`` and, on failure, ``log_tail``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "ab") as sink:
        sink.write(("$ " + " ".join(map(str, command)) + "\n").encode())
        sink.flush()
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            stop(proc, grace=10, group=False)  # mpiexec passes SIGTERM on to its ranks
            code = None
    result = {"returncode": code, "seconds": round(time.monotonic() - t0, 2), "log": str(log)}
    if code != 0:
        result["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL:]
        if code is None:
            result["error"] = f"stopped after {timeout:.0f} s (the section's time)"
    return result


def stop(proc, grace: float = 5.0, group: bool = True) -> None:
    """SIGTERM, then SIGKILL if ``proc`` is still there after ``grace`` seconds: to its process group when
    ``group`` (it leads one: ``os.setpgrp`` at its start), else to ``proc`` alone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def check_run(out: Path, steps: int, device: str, warmup: int = 0) -> dict:
    """What a launcher run directory says, and whether it is what ``steps`` steps on ``device`` should leave:
    run.json stopped at --max-steps on the right device with one rank, and one event per step 0..steps-1.
    Counts (NaN steps, AMP and high-gradient skips) are :func:`vaepatch.runs.events.count` of events.jsonl;
    ``median_step_s`` is the median event time after ``warmup`` steps."""
    problems = []
    try:
        manifest = run_manifest.read(out / "run.json") or {}
    except run_manifest.LaunchError as err:
        manifest = {}
        problems.append(str(err))
    if not manifest and not problems:
        problems.append("no run.json")
    for key, expected in (("status", f"stopped at --max-steps {steps}"), ("device", device), ("world_size", 1)):
        if manifest and manifest.get(key) != expected:
            problems.append(f"run.json {key} {manifest.get(key)!r}, expected {expected!r}")
    try:
        log = events.read(out)
    except FileNotFoundError as err:
        return {"ok": False, "problems": problems + [str(err)], "events": 0, "status": manifest.get("status")}
    problems += log.problems
    logged = [(e["step"], e["rank"]) for e in log.events]
    if logged != [(s, 0) for s in range(steps)]:
        problems.append(f"events for {len(logged)} (step, rank) pairs, expected steps 0..{steps - 1} "
                        "on rank 0 once each")
    counts = events.count(log)
    times = [e["time"] for e in log.events if e["step"] >= warmup]
    losses = [e["loss"] for e in log.events if e["loss"] is not None]
    return {
        "ok": not problems, "problems": problems, "status": manifest.get("status"), "device": manifest.get("device"),
        "world_size": manifest.get("world_size"), "compat": [s["name"] for s in manifest.get("compat", [])],
        "events": len(log.events), "steps": counts.steps, "nan_steps": counts.nan_steps,
        "amp_skips": counts.amp_skips, "grad_skips": counts.grad_skips, "skipped": counts.skipped,
        "nonfinite_loss_steps": counts.nonfinite_loss_steps, "first_nan_step": counts.first_nan_step,
        "amp_skip_steps": [e["step"] for e in log.events if e["reason"] == "amp"][:20],
        "median_step_s": statistics.median(times) if times else None, "timed_steps": len(times),
        "first_loss": losses[0] if losses else None, "last_loss": counts.last_loss,
    }


def _offline_cifar10() -> None:
    """torchvision's CIFAR10 replaced by vaepatch's reader of CIFAR-format files (module docstring)."""
    try:
        import torchvision.datasets as tv_datasets
    except Exception:  # noqa: BLE001 - no torchvision (or a broken one): the torchvision-stub-nvae shim reads them
        return
    from vaepatch.targets.nvae.shims import Cifar10Reader

    tv_datasets.CIFAR10 = Cifar10Reader


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "run-nvae":
        print("usage: python -m vaepatch.bench.gpu.runs run-nvae <vaepatch run nvae options> -- <train.py args>",
              file=sys.stderr)
        return 2
    _offline_cifar10()
    from vaepatch.run_command import main as run_main

    return run_main(["nvae", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
