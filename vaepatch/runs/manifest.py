"""``run.json``: what a run is (target, variant, upstream commit, seed, argv, host) and how it went.

Every launcher (and ``vaepatch demo``) writes the same keys through :func:`new`, replaces the file
atomically (:func:`write`), and refuses to continue a run made with another variant
(:func:`previous`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from vaepatch.version import __version__

__all__ = ["FILENAME", "LaunchError", "now", "new", "machine", "source_commit", "wall_seconds", "read", "previous",
           "write", "write_atomic"]

FILENAME = "run.json"


class LaunchError(RuntimeError):
    """The run cannot start as asked; the message says what to change."""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def new(target: str, variant: str, variant_spec: str, *, upstream_commit, seed, argv, loss_unit, **extra) -> dict:
    """A fresh manifest with the contract's keys (``DESIGN.md``: runs, events, reports), then ``extra``."""
    return {"target": target, "variant": str(variant), "variant_spec": variant_spec,
            "upstream_commit": upstream_commit, "vaepatch_version": __version__, "seed": seed,
            "argv": list(argv), "host": socket.gethostname(), "started": now(), "loss_unit": loss_unit,
            "vaepatch_commit": source_commit(), "machine": machine(), **extra}


def machine() -> dict:
    """What a run ran on, so a number can be traced to its machine: CPU model, cores, torch, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            from importlib.metadata import version

            torch_version = version("torch")
        except Exception:  # not installed: a report-only reader
            torch_version = None
    else:
        torch_version = torch.__version__
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch_version, "python": platform.python_version()}


def source_commit() -> str | None:
    """The git commit of the vaepatch checkout this code runs from (``+dirty`` with uncommitted changes),
    or None for an installed wheel."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not (Path(top) / "vaepatch" / "runs" / "manifest.py").exists():  # some other repository around a wheel
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "vaepatch"], cwd=top,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def wall_seconds(manifest: dict) -> float | None:
    """Seconds from a run's start to its end, from run.json (None while it has no end)."""
    try:
        started = datetime.datetime.fromisoformat(manifest["started"])
        ended = datetime.datetime.fromisoformat(manifest["ended"])
    except (KeyError, TypeError, ValueError):
        return None
    return (ended - started).total_seconds()


def read(path: Path) -> dict | None:
    """The manifest at ``path``, None if there is none; an unreadable one is a LaunchError."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise LaunchError(f"{path} exists but is not readable JSON ({e}); move it aside or use another --out") from None


def previous(out: Path, variant_spec: str, variant_name: str = "") -> dict | None:
    """The run.json already in ``out``, if any; refuses one made with another variant."""
    manifest = read(Path(out) / FILENAME)
    if manifest is not None and manifest.get("variant_spec") != variant_spec:
        raise LaunchError(f"{out} already holds a run of variant {manifest.get('variant')!r} "
                          f"({manifest.get('variant_spec')}); use another --out, or --variant "
                          f"{manifest.get('variant')!r} to continue that run")
    return manifest


def write(path: Path, manifest: dict) -> None:
    """Atomic replace: a crash while writing never leaves a half-written run.json."""
    write_atomic(path, json.dumps(manifest, indent=2, default=str) + "\n")


def write_atomic(path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` through a temporary file and ``os.replace``: readers see the old
    file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(text) if isinstance(text, bytes) else tmp.write_text(text)
    os.replace(tmp, path)
