"""Shared by the VDVAE tests: find a usable openai/vdvae clone, or skip saying why and how to get one."""
from __future__ import annotations

import pytest

from vaepatch import upstream


def vdvae_clone():
    """Path of a usable openai/vdvae clone, or None (with the reason) when there is none."""
    try:
        path = upstream.locate("vdvae")
        if path is None:
            return None, "no openai/vdvae clone (set $VAEPATCH_VDVAE or run `vaepatch fetch vdvae`)"
        upstream.verify(path, "vdvae")
        return path, ""
    except upstream.UpstreamError as err:
        return None, f"openai/vdvae clone unusable: {err}"


def require_vdvae():
    path, reason = vdvae_clone()
    if path is None:
        pytest.skip(f"SKIPPED, needs a real clone: {reason}")
    upstream.add_to_path(path)
    return path
