"""Running the 2020 upstreams on today's stack, from outside the clone.

The pinned openai/vdvae breaks on a current machine at a handful of lines (apex import,
numpy >= 1.24, torchvision at module level, and on CPU: ``.cuda()``, ``set_device``,
nccl, DDP ``device_ids``). Each fix here is a named :class:`Shim` that is switched on only
when its check says the machine needs it, replaces things from outside (``sys.modules``
entries and attributes, restored exactly by :func:`revert`), and is listed in the run's
``run.json`` so a result always says what it ran on. The clone itself is never edited.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Callable

from vaepatch.patching import Patch, PatchSet

__all__ = ["CompatError", "Shim", "VDVAE_SHIMS", "needed", "install", "Installed"]


class CompatError(RuntimeError):
    """Something the upstream needs is not available, and no shim can stand in for it."""


@dataclass(frozen=True)
class Shim:
    """One fix: ``needed(cpu)`` says whether this machine needs it; ``install()`` returns an undo."""

    name: str
    fixes: str  # the upstream line it keeps from breaking, for run.json and the README
    needed: Callable[[bool], bool]
    install: Callable[[], Callable[[], None]]


# -- sys.modules stand-ins ---------------------------------------------------------------

def _put_modules(modules: dict[str, types.ModuleType]) -> Callable[[], None]:
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


def _importable(name: str) -> bool:
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


def _stand_in(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name, f"vaepatch stand-in for {name} (see vaepatch.compat)")
    module.__vaepatch_stand_in__ = True
    module.__dict__.update(attributes)
    return module


def fused_adam_stand_in():
    """apex's FusedAdam as torch's AdamW: FusedAdam's default (adam_w_mode=True) *is* AdamW.

    Fused on CUDA like the original; on CPU torch's default implementation.
    """
    import torch

    class FusedAdam(torch.optim.AdamW):
        def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                     adam_w_mode=True, weight_decay=0.0, amsgrad=False, set_grad_none=True):
            if not (adam_w_mode and bias_correction):
                raise CompatError("vaepatch's FusedAdam stand-in implements only apex's default "
                                  "(adam_w_mode=True, bias_correction=True); install apex for other modes")
            params = list(params)
            first = params[0]["params"][0] if params and isinstance(params[0], dict) else (params or [None])[0]
            on_cuda = first is not None and first.is_cuda
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             amsgrad=amsgrad, fused=True if on_cuda else None)

    FusedAdam.__module__ = "apex.optimizers"
    return FusedAdam


def _install_apex() -> Callable[[], None]:
    optimizers = _stand_in("apex.optimizers", FusedAdam=fused_adam_stand_in())
    return _put_modules({"apex": _stand_in("apex", optimizers=optimizers), "apex.optimizers": optimizers})


def _torchvision_missing(*_args, **_kwargs):
    import torch

    raise CompatError(
        "this dataset needs torchvision (VDVAE reads ffhq_1024 through ImageFolder), but torchvision "
        f"is not importable here; install the torchvision build that matches torch {torch.__version__}")


def _install_torchvision() -> Callable[[], None]:
    datasets = _stand_in("torchvision.datasets", ImageFolder=_torchvision_missing)
    transforms = _stand_in("torchvision.transforms", ToTensor=_torchvision_missing)
    root = _stand_in("torchvision", datasets=datasets, transforms=transforms)
    return _put_modules({"torchvision": root, "torchvision.datasets": datasets,
                         "torchvision.transforms": transforms})


# -- attribute patches -------------------------------------------------------------------

def _patches(*patches: Patch, label: str) -> Callable[[], None]:
    return PatchSet(patches, label=label).apply().revert


def _vstack_rejects_generators() -> bool:
    import numpy as np

    try:
        np.vstack(row for row in ([0], [1]))
        return False
    except TypeError:
        return True


class _NumpyStackingIterables(types.ModuleType):
    """numpy, except that vstack accepts a generator (as numpy < 1.24 did)."""

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


def _install_vstack() -> Callable[[], None]:
    data = importlib.import_module("data")  # upstream's data.py, already on sys.path
    return _patches(Patch(data, "np", _NumpyStackingIterables()), label="compat numpy-vstack")


def _install_cuda_calls() -> Callable[[], None]:
    import torch

    def tensor_cuda(self, device=None, non_blocking=False, **kwargs):
        return self

    def module_cuda(self, device=None):
        return self

    return _patches(Patch(torch.Tensor, "cuda", tensor_cuda), Patch(torch.nn.Module, "cuda", module_cuda),
                    label="compat cpu .cuda()")


def _install_set_device() -> Callable[[], None]:
    import torch

    def set_device(device):
        return None

    return _patches(Patch(torch.cuda, "set_device", set_device), label="compat cpu set_device")


def _install_gloo() -> Callable[[], None]:
    import torch.distributed as dist

    original = dist.init_process_group

    def init_process_group(backend=None, *args, **kwargs):
        if backend == "nccl":
            backend = "gloo"
        return original(backend, *args, **kwargs)

    return _patches(Patch(dist, "init_process_group", init_process_group), label="compat cpu gloo")


def _install_ddp() -> Callable[[], None]:
    train_helpers = importlib.import_module("train_helpers")
    original = train_helpers.DistributedDataParallel

    def cpu_ddp(module, device_ids=None, output_device=None, *args, **kwargs):
        return original(module, *args, **kwargs)

    return _patches(Patch(train_helpers, "DistributedDataParallel", cpu_ddp), label="compat cpu DDP")


def _on_cpu(cpu: bool) -> bool:
    return cpu


VDVAE_SHIMS = (
    Shim("apex-fusedadam", "train_helpers.py: from apex.optimizers import FusedAdam (openai/vdvae#11)",
         lambda cpu: not _importable("apex.optimizers"), _install_apex),
    Shim("torchvision-stub", "data.py: torchvision imported at module level, used only by ffhq_1024",
         lambda cpu: not _importable("torchvision"), _install_torchvision),
    Shim("numpy-vstack-generator", "data.py cifar10(): np.vstack of a generator (TypeError on numpy >= 1.24)",
         lambda cpu: _vstack_rejects_generators(), _install_vstack),
    Shim("cpu-cuda-calls", "Tensor.cuda()/Module.cuda() in data.py, train.py, train_helpers.py, utils.py",
         _on_cpu, _install_cuda_calls),
    Shim("cpu-set-device", "train_helpers.setup_mpi: torch.cuda.set_device", _on_cpu, _install_set_device),
    Shim("cpu-gloo", "train_helpers.setup_mpi: init_process_group(backend='nccl')", _on_cpu, _install_gloo),
    Shim("cpu-ddp-device-ids", "train_helpers.load_vaes: DistributedDataParallel(device_ids=...) on a CPU module",
         _on_cpu, _install_ddp),
)


def needed(cpu: bool, shims=VDVAE_SHIMS) -> list[Shim]:
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
