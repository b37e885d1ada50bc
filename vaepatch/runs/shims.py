"""Running a 2020 upstream on today's stack, from outside the clone: the shim engine.

A pinned upstream breaks on a current machine at a handful of lines (an apex import, numpy >= 1.24,
torchvision or tensorboardX at module level, and on CPU: ``.cuda()``, ``set_device``, nccl). Each
fix is a named :class:`Shim` that is switched on only when its check says the machine needs it,
replaces things from outside (``sys.modules`` entries and attributes, restored exactly by
``Installed.revert``), and is listed in the run's ``run.json`` so a result always says what it ran
on. The clone itself is never edited. Each target's ``shims.py`` lists its upstream's shims, built
from the helpers here; the CPU ones (``.cuda()``, ``set_device``, nccl -> gloo) are the same for
every upstream and live here.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Callable

from vaepatch.patching import Patch, PatchSet

__all__ = ["CompatError", "Shim", "needed", "install", "Installed", "put_modules", "importable", "stand_in",
           "MissingPackage", "NumpyAcceptingGenerators", "patches", "on_cpu", "install_cuda_calls",
           "install_set_device", "install_gloo", "Compose", "RandomHorizontalFlip"]


class CompatError(RuntimeError):
    """Something the upstream needs is not available, and no shim can stand in for it."""


@dataclass(frozen=True)
class Shim:
    """One fix: ``needed(cpu)`` says whether this machine needs it; ``install()`` returns an undo."""

    name: str
    fixes: str  # the upstream line it keeps from breaking, for run.json and the README
    needed: Callable[[bool], bool]
    install: Callable[[], Callable[[], None]]


# -- torchvision transforms stand-ins (the two the upstreams' CIFAR-10 loaders use) --------------------

class Compose:
    """torchvision.transforms.Compose stand-in: applies the transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class RandomHorizontalFlip:
    """Flips a PIL image left-right with probability ``p``, drawing from torch's RNG as torchvision does."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        import torch
        from PIL import Image

        return image.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else image


# -- sys.modules stand-ins ---------------------------------------------------------------

def put_modules(modules: dict[str, types.ModuleType]) -> Callable[[], None]:
    """Put stand-in modules into sys.modules; the undo restores what was there (or nothing)."""
    before = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)

    def undo():
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return undo


def importable(name: str) -> bool:
    """True if ``import name`` works here; a broken install (wrong build) counts as absent."""
    if name in sys.modules and sys.modules[name] is not None:
        return not getattr(sys.modules[name], "__vaepatch_stand_in__", False)
    try:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            return False
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - an import that fails in any way means "not usable"
        for loaded in [m for m in sys.modules if m == name.split(".")[0] or m.startswith(name.split(".")[0] + ".")]:
            sys.modules.pop(loaded, None)
        return False


def stand_in(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name, f"vaepatch stand-in for {name} (see vaepatch.runs.shims)")
    module.__vaepatch_stand_in__ = True
    module.__dict__.update(attributes)
    return module


def null_writer(module: str) -> type:
    """A TensorBoard ``SummaryWriter`` stand-in named as ``module``'s: takes every call and writes nothing.

    An upstream's TensorBoard logs are for reading only; vaepatch's launchers record their own per-step
    events (and write TensorBoard themselves where asked)."""
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None

    return type("SummaryWriter", (), {"__init__": __init__, "__getattr__": __getattr__, "__module__": module,
                                      "__doc__": f"{module}.SummaryWriter stand-in: takes every call, writes nothing."})


class MissingPackage(types.ModuleType):
    """A stand-in for a package that is not installed: any public name is a class.

    The classes can be subclassed (NVAE subclasses ``torchvision.datasets.MNIST`` and others at
    import time), and calling one (building a dataset, a transform, ``lmdb.open``) raises a
    CompatError that says what is missing and how to install it.
    """

    def __init__(self, name: str, message: str):
        super().__init__(name, f"vaepatch stand-in for {name} (see vaepatch.runs.shims)")
        self.__vaepatch_stand_in__ = True
        self._vaepatch_message = message

    def __getattr__(self, attribute):
        if attribute.startswith("__") or attribute.startswith("_vaepatch"):
            raise AttributeError(attribute)  # keeps the import machinery (__path__, __spec__...) honest
        qualified, message = f"{self.__name__}.{attribute}", self._vaepatch_message

        def unavailable(*_args, **_kwargs):
            raise CompatError(f"{qualified} was used, but {message}")

        stand_in = type(attribute, (), {"__init__": unavailable, "__module__": self.__name__,
                                        "__doc__": f"vaepatch stand-in for {qualified}: using it raises CompatError"})
        setattr(self, attribute, stand_in)  # the same class on every access
        return stand_in



class NumpyAcceptingGenerators(types.ModuleType):
    """numpy, except that ``vstack`` and ``sum`` of a generator work as they did in 2020's numpy
    (vstack materializes it; sum of a bare generator is Python's sum). Installed only as an
    upstream module's ``np``, never as numpy itself."""

    def __init__(self):
        import numpy

        super().__init__("numpy")
        self.__numpy = numpy

    def __getattr__(self, name):
        return getattr(self.__numpy, name)

    def vstack(self, tup, *args, **kwargs):
        if not isinstance(tup, (list, tuple)) and not hasattr(tup, "__array__"):
            tup = list(tup)
        return self.__numpy.vstack(tup, *args, **kwargs)

    def sum(self, a, *args, **kwargs):
        if isinstance(a, types.GeneratorType) and not args and not kwargs:
            return sum(a)
        return self.__numpy.sum(a, *args, **kwargs)


# -- attribute patches -------------------------------------------------------------------

def patches(*items: Patch, label: str) -> Callable[[], None]:
    """Apply ``items`` as one PatchSet; returns its revert."""
    return PatchSet(items, label=label).apply().revert


def on_cpu(cpu: bool) -> bool:
    """The check of a shim needed exactly when running with --cpu."""
    return cpu


def install_cuda_calls() -> Callable[[], None]:
    import torch

    def tensor_cuda(self, device=None, non_blocking=False, **kwargs):
        return self

    def module_cuda(self, device=None):
        return self

    return patches(Patch(torch.Tensor, "cuda", tensor_cuda), Patch(torch.nn.Module, "cuda", module_cuda),
                    label="compat cpu .cuda()")


def install_set_device() -> Callable[[], None]:
    import torch

    def set_device(device):
        return None

    return patches(Patch(torch.cuda, "set_device", set_device), label="compat cpu set_device")


def install_gloo() -> Callable[[], None]:
    import torch.distributed as dist

    original = dist.init_process_group

    def init_process_group(backend=None, *args, **kwargs):
        if backend == "nccl":
            backend = "gloo"
        return original(backend, *args, **kwargs)

    return patches(Patch(dist, "init_process_group", init_process_group), label="compat cpu gloo")


def needed(cpu: bool, shims) -> list[Shim]:
    """The shims this machine needs, in install order (stand-in modules before upstream imports)."""
    return [shim for shim in shims if shim.needed(cpu)]


@dataclass
class Installed:
    """What :func:`install` switched on; ``revert()`` undoes it in reverse order."""

    shims: list[Shim]
    _undo: list[Callable[[], None]]

    @property
    def names(self) -> list[str]:
        return [shim.name for shim in self.shims]

    def revert(self) -> None:
        while self._undo:
            self._undo.pop()()


def install(shims: list[Shim]) -> Installed:
    """Install ``shims`` in order; if one fails, the ones before it are undone and the error raised."""
    done = Installed([], [])
    try:
        for shim in shims:
            done._undo.append(shim.install())
            done.shims.append(shim)
    except BaseException:
        done.revert()
        raise
    return done
