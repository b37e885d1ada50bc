"""The registry of upstreams: one package per upstream under ``vaepatch/targets/``, one pin each.

Adding an upstream is one folder ``vaepatch/targets/<name>/`` plus its ``[<name>]`` entry in
``upstream_pins.toml`` (and ``third_party/UPSTREAM.toml``), with a ``library = true`` entry for each
library its code imports that vaepatch fetches too (Efficient-VDVAE's ``hparams``). The folder provides,
by convention (the way Hugging Face transformers finds ``modeling_<name>.py``), and imports no other target:

- ``__init__.py``: ``NAME`` (the pin's name), ``REPO`` ("owner/name"), ``MODULES`` (the upstream's
  top-level modules the patch needs, imported in this order), optionally ``IMPORT_HINT`` (what to do
  when importing the clone fails) and ``BENCHES`` (``vaepatch bench`` name -> module with ``main``).
  Constants only: importing it must not import torch models or the upstream.
- ``patch.py``: ``build(variant, modules, fuse=False) -> list[vaepatch.patching.Patch]``, what
  ``vaepatch.apply`` replaces, with each original's fingerprint at the pinned commit.
- ``shims.py``: ``SHIMS``, the ``vaepatch.runs.shims.Shim`` fixes the pinned code needs on today's stack.
- ``launch.py``: ``add_arguments(parser)`` (its own ``vaepatch run`` options) and
  ``run_from_args(args, train_args) -> run.json dict``, built on ``vaepatch.runs``.
- ``logs.py``: ``UPSTREAM_LOG``, a ``vaepatch.runs.logs.UpstreamLog`` reading the upstream's own log,
  registered here so ``vaepatch compare`` reads it by the ``target`` a ``run.json`` names.
"""
from __future__ import annotations

import importlib

from vaepatch import upstream
from vaepatch.runs import logs

__all__ = ["NAMES", "package", "part", "benches"]

NAMES = tuple(n for n, p in upstream.PINS.items() if not p.library)  # one per pin that is no library
PARTS = ("patch", "shims", "launch", "logs")


def package(name: str):
    """The target package ``vaepatch.targets.<name>``; an unknown name lists the supported ones."""
    if name not in NAMES:
        raise ValueError(f"unknown target {name!r}; supported: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def part(name: str, part_name: str):
    """One of a target's conventional modules (``patch``, ``shims``, ``launch``, ``logs``)."""
    if part_name not in PARTS:
        raise ValueError(f"unknown target part {part_name!r}; one of {', '.join(PARTS)}")
    package(name)
    return importlib.import_module(f"{__name__}.{name}.{part_name}")


def benches() -> dict:
    """``vaepatch bench`` names that belong to one upstream -> their modules."""
    return {bench: module for name in NAMES for bench, module in getattr(package(name), "BENCHES", {}).items()}


for _name in NAMES:  # every target's own log reader, for `vaepatch compare`
    logs.register(part(_name, "logs").UPSTREAM_LOG)
