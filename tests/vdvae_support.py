"""Shared by the VDVAE tests: find a usable openai/vdvae clone, or skip saying why and how to get one."""
from __future__ import annotations

import shlex

import pytest

from vaepatch import upstream


def usable_clone(name, label):
    """Path of a usable clone of upstream ``name``, or None (with the reason) when there is none."""
    try:
        path = upstream.locate(name)
        if path is None:
            # --dest spelled out: an installed `vaepatch` outside this checkout would fetch into ~/.cache
            dest = shlex.quote(str(upstream.default_dest(name)))
            return None, (f"no {label} clone (set ${upstream.pin(name).env} or run "
                          f"`vaepatch fetch {name} --dest {dest}`)")
        upstream.verify(path, name)
        return path, ""
    except upstream.UpstreamError as err:
        return None, f"{label} clone unusable: {err}"


def vdvae_clone():
    """Path of a usable openai/vdvae clone, or None (with the reason) when there is none."""
    return usable_clone("vdvae", "openai/vdvae")


def require_vdvae():
    path, reason = vdvae_clone()
    if path is None:
        pytest.skip(f"SKIPPED, needs a real clone: {reason}")
    upstream.add_to_path(path)
    return path
