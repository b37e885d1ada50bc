"""Shared by the Efficient-VDVAE tests: a usable clone and its hparams library (or skip saying why; an error in CI,
as for the other upstreams), and its modules imported in isolation under the tiny configuration.

Efficient-VDVAE's top-level names (``model``, ``utils``, ``data``) collide with NVAE's and VDVAE's, and its
modules hold the configuration loaded before they were imported, so :func:`effvdvae_imported` takes them (and
``hparams``) out of ``sys.modules`` again when it is done, putting back whatever was there before.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import pytest

from tests.vdvae_support import usable_clone
from vaepatch import upstream
from vaepatch.targets.effvdvae import MODULES, config, shims, tiny

ROOTS = ("model", "utils", "data", "hparams", "train")  # top-level names the clone and hparams define


def require_effvdvae():
    """The verified Efficient-VDVAE clone (and an hparams clone beside it), or a skip with the reason."""
    path, reason = usable_clone("effvdvae", "Rayhane-mamah/Efficient-VDVAE")
    if path is not None:
        library, reason = usable_clone("hparams", "Rayhane-mamah/hparams (Efficient-VDVAE's config library)")
        path = path if library is not None else None
    if path is None:
        pytest.skip(f"SKIPPED, needs a real clone: {reason}")
    return path


@contextlib.contextmanager
def effvdvae_imported(path, folder, overrides=()):
    """Efficient-VDVAE's modules imported from ``path`` under the tiny configuration (plus ``overrides``,
    ``section.key=value``) written to and loaded from ``folder``, with the CPU shims on: yields a dict of
    its modules and ``hparams`` (the loaded configuration). On exit everything is put back."""
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ROOTS}
    for name in saved:
        del sys.modules[name]
    saved_path = list(sys.path)
    stand_ins = shims.install(cpu=True)
    after = None
    try:
        upstream.activate("effvdvae", path)
        config.write(config.base_config(path), config.parse_overrides([*tiny.TRAIN_ARGS, *overrides]), folder)
        hparams = config.load(folder)
        modules = {m: importlib.import_module(m) for m in (*MODULES, "model.model", "model.def_model")}
        after = shims.install_after_import(cpu=True)
        yield {"hparams": hparams, **modules}
    finally:
        from vaepatch.api import revert

        revert("effvdvae")
        if after is not None:
            after.revert()
        stand_ins.revert()
        for name in [n for n in sys.modules if n.split(".")[0] in ROOTS]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path[:] = saved_path
