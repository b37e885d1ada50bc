"""Shared by the VDVAE tests: find a usable openai/vdvae clone, or skip saying why and how to get one."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from vaepatch import upstream

# Beside every checkout in CI: git bundles of the pinned upstreams (.ci/run fetches from them).
SHARED_UPSTREAM = Path(__file__).resolve().parents[1].parent / "shared" / "upstream"


def clones_required() -> str | None:
    """Why a missing clone is an error rather than a skip here, or None: in CI (``$CI`` set) with the
    bundles beside the checkout, every clone-needing test must run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and SHARED_UPSTREAM.is_dir():
        return f"CI=${{CI}} and {SHARED_UPSTREAM} holds the pinned upstreams (.ci/run fetches them from there)"
    return None


class MissingCloneInCI(RuntimeError):
    """A clone-needing test would skip in CI: an error, so that it cannot pass unseen."""


def usable_clone(name, label):
    """Path of a usable clone of upstream ``name``, or None (with the reason) when there is none;
    in CI with the bundles (:func:`clones_required`) no clone raises :class:`MissingCloneInCI`."""
    try:
        path = upstream.locate(name)
        if path is None:
            # --dest spelled out: an installed `vaepatch` outside this checkout would fetch into ~/.cache
            dest = shlex.quote(str(upstream.default_dest(name)))
            reason = (f"no {label} clone (set ${upstream.pin(name).env} or run "
                      f"`vaepatch fetch {name} --dest {dest}`)")
        else:
            upstream.verify(path, name)
            return path, ""
    except upstream.UpstreamError as err:
        reason = f"{label} clone unusable: {err}"
    required = clones_required()
    if required:
        raise MissingCloneInCI(f"{reason}; {required}, so the tests that need it must run, not skip. "
                               f"run: python -m vaepatch fetch --source {SHARED_UPSTREAM}")
    return None, reason


def vdvae_clone():
    """Path of a usable openai/vdvae clone, or None (with the reason) when there is none."""
    return usable_clone("vdvae", "openai/vdvae")


def require_vdvae():
    path, reason = vdvae_clone()
    if path is None:
        pytest.skip(f"SKIPPED, needs a real clone: {reason}")
    upstream.add_to_path(path)
    return path
