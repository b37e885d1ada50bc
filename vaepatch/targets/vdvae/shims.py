"""openai/vdvae on today's stack: the shims ``vaepatch run vdvae`` switches on where needed.

The pinned VDVAE (2020) imports apex and torchvision at module level, feeds a generator to
``np.vstack`` (a TypeError since numpy 1.24), and on CPU calls ``.cuda()``, ``set_device``, nccl
and DDP with ``device_ids``. Each fix is a :class:`vaepatch.runs.shims.Shim`.
"""
from __future__ import annotations

import importlib
from typing import Callable

from vaepatch.patching import Patch
from vaepatch.runs.shims import (CompatError, NumpyAcceptingGenerators, Shim, importable, install_cuda_calls,
                                 install_gloo, install_set_device, on_cpu, patches, put_modules, stand_in)

__all__ = ["SHIMS", "install", "fused_adam_stand_in"]


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
    optimizers = stand_in("apex.optimizers", FusedAdam=fused_adam_stand_in())
    return put_modules({"apex": stand_in("apex", optimizers=optimizers), "apex.optimizers": optimizers})


def _torchvision_missing(*_args, **_kwargs):
    import torch

    raise CompatError(
        "this dataset needs torchvision (VDVAE reads ffhq_1024 through ImageFolder), but torchvision "
        f"is not importable here; install the torchvision build that matches torch {torch.__version__}")


def _install_torchvision() -> Callable[[], None]:
    datasets = stand_in("torchvision.datasets", ImageFolder=_torchvision_missing)
    transforms = stand_in("torchvision.transforms", ToTensor=_torchvision_missing)
    root = stand_in("torchvision", datasets=datasets, transforms=transforms)
    return put_modules({"torchvision": root, "torchvision.datasets": datasets,
                         "torchvision.transforms": transforms})


def _vstack_rejects_generators() -> bool:
    import numpy as np

    try:
        np.vstack(row for row in ([0], [1]))
        return False
    except TypeError:
        return True


def _install_vstack() -> Callable[[], None]:
    data = importlib.import_module("data")  # upstream's data.py, already on sys.path
    return patches(Patch(data, "np", NumpyAcceptingGenerators()), label="compat numpy-vstack")


def _install_ddp() -> Callable[[], None]:
    train_helpers = importlib.import_module("train_helpers")
    original = train_helpers.DistributedDataParallel

    def cpu_ddp(module, device_ids=None, output_device=None, *args, **kwargs):
        return original(module, *args, **kwargs)

    return patches(Patch(train_helpers, "DistributedDataParallel", cpu_ddp), label="compat cpu DDP")


SHIMS = (
    Shim("apex-fusedadam", "train_helpers.py: from apex.optimizers import FusedAdam (openai/vdvae#11)",
         lambda cpu: not importable("apex.optimizers"), _install_apex),
    Shim("torchvision-stub", "data.py: torchvision imported at module level, used only by ffhq_1024",
         lambda cpu: not importable("torchvision"), _install_torchvision),
    Shim("numpy-vstack-generator", "data.py cifar10(): np.vstack of a generator (TypeError on numpy >= 1.24)",
         lambda cpu: _vstack_rejects_generators(), _install_vstack),
    Shim("cpu-cuda-calls", "Tensor.cuda()/Module.cuda() in data.py, train.py, train_helpers.py, utils.py",
         on_cpu, install_cuda_calls),
    Shim("cpu-set-device", "train_helpers.setup_mpi: torch.cuda.set_device", on_cpu, install_set_device),
    Shim("cpu-gloo", "train_helpers.setup_mpi: init_process_group(backend='nccl')", on_cpu, install_gloo),
    Shim("cpu-ddp-device-ids", "train_helpers.load_vaes: DistributedDataParallel(device_ids=...) on a CPU module",
         on_cpu, _install_ddp),
)


def install(cpu: bool):
    """Switch on the shims in SHIMS this machine needs (``cpu``: running with --cpu); ``.revert()`` undoes them."""
    from vaepatch.runs import shims

    return shims.install(shims.needed(cpu, SHIMS))
