"""apply / revert / patched / active: one call patches each supported upstream that is present.

Each target package (``vaepatch/targets/<name>/``, found through the registry ``vaepatch.targets``)
says which upstream modules it needs (``MODULES``) and builds its patch list (``patch.build``);
this module finds the upstream, checks its commit, imports it, and keeps one active PatchSet per
target.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field

from vaepatch import targets as _targets
from vaepatch import upstream as _upstream
from vaepatch.patching import PatchSet
from vaepatch.variant import Variant

__all__ = ["apply", "revert", "patched", "active", "Handle"]

TARGETS = _targets.NAMES
_active: dict = {}  # target name -> Handle


@dataclass
class Handle:
    """What one ``apply`` did to one upstream: the variant, where it came from, the patches."""

    target: str
    variant: Variant
    location: str
    patchset: PatchSet = field(repr=False)
    fuse: bool = False

    def revert(self):
        self.patchset.revert()
        if _active.get(self.target) is self:
            del _active[self.target]


def _target_module(name):
    return _targets.package(name)


def _import_upstream(name, upstream, strict):
    """The upstream's modules: already imported ones win, else the located clone (verified)."""
    target = _target_module(name)
    if all(m in sys.modules for m in target.MODULES) and upstream is None:
        modules = {m: sys.modules[m] for m in target.MODULES}
        return modules, getattr(modules[target.MODULES[-1]], "__file__", "already imported")
    path = _upstream.locate(name, upstream)
    if path is None:
        raise _upstream.UpstreamError(
            f"no {name} clone found (looked at upstream=, ${_upstream.pin(name).env}, {_upstream.default_dest(name)}) "
            f"and its modules {', '.join(target.MODULES)} are not imported.\nrun: vaepatch fetch {name}")
    try:
        _upstream.verify(path, name)
    except _upstream.UpstreamError:
        if strict:
            raise
        warnings.warn(f"{name} clone at {path} is not the pinned commit or has local edits; "
                      "patching anyway (strict=False)", stacklevel=4)
    _upstream.activate(name, path)  # the clone's import folder, and the libraries it needs
    try:
        modules = {m: importlib.import_module(m) for m in target.MODULES}
    except (ImportError, KeyError) as err:  # KeyError: Efficient-VDVAE's modules read a config loaded first
        raise _upstream.UpstreamError(f"importing the {name} clone at {path} failed: {err}\n"
                                      f"{getattr(target, 'IMPORT_HINT', '')}".rstrip()) from err
    for m, mod in modules.items():
        if not str(getattr(mod, "__file__", "")).startswith(str(path)):
            raise _upstream.UpstreamError(f"module {m!r} was imported from {getattr(mod, '__file__', '?')}, "
                                          f"not from the {name} clone at {path}: another module named {m!r} "
                                          f"shadows it. Start a fresh interpreter, or put {path} first on sys.path.")
    return modules, str(path)


def _present(name):
    target = _target_module(name)
    if all(m in sys.modules for m in target.MODULES):
        return True
    try:
        return _upstream.locate(name) is not None
    except _upstream.UpstreamError:
        return True  # an explicit but broken location: let apply report it


def _imported(name):
    return all(m in sys.modules for m in _target_module(name).MODULES)


def _default_targets():
    """Upstreams already imported win; else the one clone present. Two clones and nothing imported
    is ambiguous (their top-level module names clash, e.g. both have ``utils``): ask for target=."""
    imported = [n for n in TARGETS if _imported(n)]
    if imported:
        return imported
    present = [n for n in TARGETS if _present(n)]
    if len(present) > 1:
        raise ValueError(f"clones of {', '.join(present)} are all present and none is imported yet, so vaepatch "
                         "cannot tell which one you train: pass target=" + " or target=".join(map(repr, present))
                         + " (one upstream per process: their module names clash)")
    return present


def _fuse_default():
    return os.environ.get("VAEPATCH_FUSE", "0").strip().lower() in ("1", "true", "yes", "on")


def apply(variant, target=None, upstream=None, strict=True, fuse=None):
    """Patch ``target`` (default: every supported upstream that is present) with ``variant``.

    ``fuse=True`` (default: ``$VAEPATCH_FUSE``, off) compiles each block's elementwise math
    with ``torch.compile``: a one-off compile (~25 s on CPU) for a faster step.

    Applying the variant already active is a no-op; another variant is swapped in after the
    old one is reverted.  Returns the Handle (or a list of them when target is None and more
    than one upstream is present).
    """
    variant = Variant.parse(variant)
    names = [target] if target is not None else _default_targets()
    if not names:
        raise _upstream.UpstreamError(
            "no supported upstream found to patch: none of "
            + ", ".join(f"{n} ({_upstream.default_dest(n)}, ${_upstream.pin(n).env})" for n in TARGETS)
            + " is present or imported.\nrun: vaepatch fetch vdvae   (or pass upstream=PATH and target=...)")
    fuse = _fuse_default() if fuse is None else bool(fuse)
    handles = [_apply_one(n, variant, upstream, strict, fuse) for n in names]
    return handles[0] if len(handles) == 1 else handles


def _apply_one(name, variant, upstream, strict, fuse):
    active = _active.get(name)
    if active is not None and active.variant.spec == variant.spec and active.fuse == fuse and upstream is None:
        return active
    modules, location = _import_upstream(name, upstream, strict)
    if active is not None:
        active.revert()
    patches = [] if variant.is_vanilla else _targets.part(name, "patch").build(variant, modules, fuse=fuse)
    pinned = _upstream.pin(name).commit
    patchset = PatchSet(patches, label=f"{name} ({location}) with variant {variant.name!r}", pinned_commit=pinned)
    patchset.apply(strict=strict)
    handle = Handle(name, variant, location, patchset, fuse)
    _active[name] = handle
    return handle


def revert(target=None):
    """Restore every original of ``target`` (default: all patched targets) exactly."""
    names = [target] if target is not None else list(_active)
    for name in names:
        if name in _active:
            _active[name].revert()


def active():
    """Target name -> variant currently applied."""
    return {name: handle.variant for name, handle in _active.items()}


@contextlib.contextmanager
def patched(variant, target=None, upstream=None, strict=True, fuse=None):
    """``with vaepatch.patched("upbounded1"): ...`` — apply on entry, restore on exit."""
    before = dict(_active)
    handles = apply(variant, target, upstream, strict, fuse)
    try:
        yield handles
    finally:
        for handle in handles if isinstance(handles, list) else [handles]:
            handle.revert()
        for name, previous in before.items():  # put back what was active before the block
            if name not in _active:
                previous.patchset.apply(strict=False)
                _active[name] = previous
