"""``run.json``: what a run is (target, variant, upstream commit, seed, argv, host) and how it went.

Every launcher (and ``vaepatch demo``) writes the same keys through :func:`new`, replaces the file
atomically (:func:`write`), and refuses to continue a run made with another variant
(:func:`previous`).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from vaepatch.version import __version__

__all__ = ["FILENAME", "LaunchError", "now", "new", "read", "previous", "write", "write_atomic"]

FILENAME = "run.json"


class LaunchError(RuntimeError):
    """The run cannot start as asked; the message says what to change."""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def new(target: str, variant: str, variant_spec: str, *, upstream_commit, seed, argv, loss_unit, **extra) -> dict:
    """A fresh manifest with the contract's keys (``DESIGN.md``: runs, events, reports), then ``extra``."""
    return {"target": target, "variant": str(variant), "variant_spec": variant_spec,
            "upstream_commit": upstream_commit, "vaepatch_version": __version__, "seed": seed,
            "argv": list(argv), "host": socket.gethostname(), "started": now(), "loss_unit": loss_unit, **extra}


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
