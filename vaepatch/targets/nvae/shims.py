"""NVlabs/NVAE on today's stack: the shims ``vaepatch run nvae`` switches on where needed.

The pinned NVAE imports tensorboardX (utils.py), lmdb (lmdb_datasets.py) and torchvision
(datasets.py, thirdparty/lsun.py, fid/) at module level, subclassing torchvision classes at
import time; calls .cuda() in model.py, distributions.py, utils.py and neural_ar_operations.py;
and its batch norms refuse CPU tensors (SyncBatchNormSwish always, nn.SyncBatchNorm once a
process group exists, which train.py always creates, with nccl, after torch.cuda.set_device).
Each fix is a :class:`vaepatch.runs.shims.Shim`.
"""
from __future__ import annotations

import importlib
from typing import Callable

from vaepatch.patching import Patch
from vaepatch.runs.shims import (Compose, MissingPackage, NumpyAcceptingGenerators, RandomHorizontalFlip, Shim,
                                 importable, install_cuda_calls, install_gloo, install_set_device, null_writer, on_cpu,
                                 patches, put_modules, stand_in)

__all__ = ["SHIMS", "install"]


def _install_tensorboardx() -> Callable[[], None]:
    return put_modules({"tensorboardX": stand_in("tensorboardX", SummaryWriter=null_writer("tensorboardX"))})


def _install_lmdb() -> Callable[[], None]:
    message = ("lmdb is not importable here; NVAE reads celeba, imagenet, ffhq and lsun from LMDB files: "
               "pip install lmdb")
    return put_modules({"lmdb": MissingPackage("lmdb", message)})


def _install_torchvision_nvae() -> Callable[[], None]:
    import torch

    message = (f"torchvision is not importable here; NVAE needs it for its datasets, transforms and FID. "
               f"Install the torchvision build that matches torch {torch.__version__}")
    names = ["torchvision", "torchvision.datasets", "torchvision.datasets.vision", "torchvision.datasets.utils",
             "torchvision.transforms", "torchvision.models", "torchvision.models.inception"]
    modules = {name: MissingPackage(name, message) for name in names}
    modules["torchvision"].__version__ = "0.0"  # fid/inception.py parses it before calling a (stand-in) model
    for name, module in modules.items():
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, module)
    # What NVAE's default dataset needs, working: cifar10 = CIFAR10 + Compose(RandomHorizontalFlip, ToTensor)
    modules["torchvision.datasets"].CIFAR10 = Cifar10Reader
    for public, transform in (("Compose", Compose), ("RandomHorizontalFlip", RandomHorizontalFlip),
                              ("ToTensor", _ToTensor)):
        setattr(modules["torchvision.transforms"], public, transform)
    return put_modules(modules)


class Cifar10Reader:
    """torchvision.datasets.CIFAR10 stand-in: reads ``root/cifar-10-batches-py`` (the real CIFAR-10 or
    ``vaepatch make-data``) and never downloads; items are (transform(PIL image), label)."""

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        from vaepatch import cifar_format

        self.data, self.targets = cifar_format.read(root, train)
        self.transform, self.target_transform = transform, target_transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        from PIL import Image

        image, label = Image.fromarray(self.data[index]), self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label


class _ToTensor:
    """An 8-bit PIL image or HxWxC uint8 array to a float CxHxW tensor in [0, 1]."""

    def __call__(self, image):
        import numpy as np
        import torch

        array = np.array(image, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).float().div(255)


_ALL_REDUCE_SUM = []


def _all_reduce_sum():
    """An autograd Function: sum over the process group forward, and of the gradients backward."""
    if not _ALL_REDUCE_SUM:
        import torch
        import torch.distributed as dist

        class AllReduceSum(torch.autograd.Function):
            @staticmethod
            def forward(ctx, tensor, group):
                ctx.group = group
                total = tensor.clone()
                dist.all_reduce(total, group=group)
                return total

            @staticmethod
            def backward(ctx, grad):
                total = grad.clone()
                dist.all_reduce(total, group=ctx.group)
                return total, None

        _ALL_REDUCE_SUM.append(AllReduceSum)
    return _ALL_REDUCE_SUM[0]


def batch_norm_cpu(bn, x):
    """``bn``'s batch norm of a CPU tensor, in training synchronised over the process group.

    With one process (or no process group, or in eval) this is the module's own
    ``_BatchNorm.forward`` (what the GPU code falls back to when there is nothing to sync). With
    several gloo processes the batch statistics are summed over all of them with autograd-aware
    all-reduces (two passes: mean, then centred second moment), as SyncBatchNorm does on GPUs.
    """
    import torch
    import torch.distributed as dist
    from torch.nn.modules.batchnorm import _BatchNorm

    group = getattr(bn, "process_group", None) or (dist.group.WORLD if dist.is_available() else None)
    synced = (bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1)
    if not synced:
        return _BatchNorm.forward(bn, x)
    all_reduce = _all_reduce_sum().apply

    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    count = torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float64)
    dist.all_reduce(count, group=group)
    n = count.item()
    mean = all_reduce(x.sum(dims), group) / n
    centred = x - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims), group) / n
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=factor)
    return out


def _sum_rejects_generators() -> bool:
    import numpy as np

    try:
        np.sum(x for x in (0, 1))
        return False
    except TypeError:
        return True


def _install_sum() -> Callable[[], None]:
    utils = importlib.import_module("utils")  # upstream's utils.py, already on sys.path
    return patches(Patch(utils, "np", NumpyAcceptingGenerators()), label="compat numpy-sum-generator")


def _install_sync_batchnorm_cpu() -> Callable[[], None]:
    sync_bn_swish = importlib.import_module("thirdparty.inplaced_sync_batchnorm")  # upstream's, on sys.path
    neural_operations = importlib.import_module("neural_operations")
    swish_class = sync_bn_swish.SyncBatchNormSwish
    wrapper_class = neural_operations.SyncBatchNorm
    swish_forward, wrapper_forward = swish_class.__dict__["forward"], wrapper_class.__dict__["forward"]
    swish = sync_bn_swish.swish  # upstream's own Swish autograd function, as its forward applies it

    def swish_bn_forward(self, input):
        if input.device.type != "cpu":  # upstream's own path (GPU + process group)
            return swish_forward(self, input)
        return swish.apply(batch_norm_cpu(self, input))

    def wrapper_bn_forward(self, x):
        if x.device.type != "cpu":
            return wrapper_forward(self, x)
        return batch_norm_cpu(self.bn, x)

    return patches(Patch(swish_class, "forward", swish_bn_forward), Patch(wrapper_class, "forward", wrapper_bn_forward),
                    label="compat cpu sync batch norm")


_NAMESPACE_ALLOWED = []  # non-empty while the torch-load-namespace shim is installed


def _load_rejects_namespace() -> bool:
    """torch >= 2.6 loads weights only by default and refuses an argparse.Namespace in a checkpoint
    (still true while our shim allows it: the machine needs the shim either way)."""
    import argparse
    import io

    import torch

    if _NAMESPACE_ALLOWED:
        return True

    buffer = io.BytesIO()
    torch.save({"args": argparse.Namespace(seed=1)}, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, map_location="cpu")
    except Exception:  # noqa: BLE001 - pickle.UnpicklingError, or whatever a future torch raises
        return True
    return False


def _install_namespace_load() -> Callable[[], None]:
    import argparse

    from torch import serialization

    if argparse.Namespace in serialization.get_safe_globals():
        return lambda: None
    serialization.add_safe_globals([argparse.Namespace])
    _NAMESPACE_ALLOWED.append(True)

    def undo():  # take out only what we added: torch registers its own entries lazily, keep those
        keep = [g for g in serialization.get_safe_globals() if g is not argparse.Namespace]
        serialization.clear_safe_globals()
        serialization.add_safe_globals(keep)
        _NAMESPACE_ALLOWED.clear()

    return undo


def _install_cpu_grad_scaler() -> Callable[[], None]:
    """NVAE's ``GradScaler(2**10)`` (torch.cuda.amp, imported by train.py) as torch.amp's CPU scaler.

    On a GPU NVAE trains under AMP, whose scaler skips every step with inf/NaN gradients and halves
    its scale; torch.cuda.amp's scaler disables itself without CUDA, and NVAE in float32 then applies a
    NaN step and its weights go NaN. With the CPU scaler, a run on the CPU handles a non-finite step
    the way NVAE's users' runs do. The forward stays in float32 (autocast is CUDA-only in train.py):
    the scaler's rule, not half precision, is what this keeps.
    """
    import torch
    import torch.cuda.amp

    class GradScaler(torch.amp.GradScaler):
        def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                     enabled=True):
            super().__init__("cpu", init_scale, growth_factor, backoff_factor, growth_interval, enabled)

    GradScaler.__qualname__ = "CpuGradScaler"
    return patches(Patch(torch.cuda.amp, "GradScaler", GradScaler), label="vaepatch NVAE CPU grad scaler")


SHIMS = (
    Shim("tensorboardx-stub", "utils.py: from tensorboardX import SummaryWriter "
         "(module level; the stand-in writes nothing)",
         lambda cpu: not importable("tensorboardX"), _install_tensorboardx),
    Shim("lmdb-stub", "lmdb_datasets.py: import lmdb (module level; used by the celeba/imagenet/ffhq/lsun loaders)",
         lambda cpu: not importable("lmdb"), _install_lmdb),
    Shim("torchvision-stub-nvae", "datasets.py: class StackedMNIST(dset.MNIST), thirdparty/lsun.py: "
         "class LSUNClass(VisionDataset), fid/inception.py: "
         "class FIDInceptionA(torchvision.models.inception.InceptionA) "
         "(torchvision classes subclassed at import time); datasets.py cifar10: CIFAR10, Compose, "
         "RandomHorizontalFlip, ToTensor work (CIFAR-10's python batches read from --data, never downloaded)",
         lambda cpu: not importable("torchvision"), _install_torchvision_nvae),
    Shim("numpy-sum-generator", "utils.count_parameters_in_M (called by train.py): np.sum of a generator "
         "(deprecated since numpy 1.15, a TypeError now)", lambda cpu: _sum_rejects_generators(), _install_sum),
    Shim("torch-load-namespace", "train.py --cont_training: torch.load of NVAE's checkpoint, which holds its "
         "argparse.Namespace (torch >= 2.6 loads weights only by default: UnpicklingError); Namespace allowed",
         lambda cpu: _load_rejects_namespace(), _install_namespace_load),
    Shim("cpu-cuda-calls", "Tensor.cuda()/Module.cuda() in model.py (sample, spectral_norm_parallel), distributions.py "
         "(DiscMixLogistic.sample), utils.py (kl_balancer_coeff, one_hot), neural_ar_operations.py (ARConv2d mask), "
         "train.py",
         on_cpu, install_cuda_calls),
    Shim("cpu-sync-batchnorm", "thirdparty/inplaced_sync_batchnorm.py SyncBatchNormSwish.forward: "
         "'SyncBatchNorm expected input tensor to be on GPU'; neural_operations.SyncBatchNorm (nn.SyncBatchNorm) "
         "refuses CPU tensors once a process group exists",
         on_cpu, _install_sync_batchnorm_cpu),
    Shim("cpu-set-device", "train.py init_processes: torch.cuda.set_device", on_cpu, install_set_device),
    Shim("cpu-gloo", "train.py init_processes: dist.init_process_group(backend='nccl')", on_cpu, install_gloo),
    Shim("cpu-grad-scaler", "train.py: GradScaler(2**10) from torch.cuda.amp disables itself without CUDA, so a "
         "step with non-finite gradients would be applied; torch.amp's CPU scaler skips it as AMP does on a GPU "
         "(forward still float32)", on_cpu, _install_cpu_grad_scaler),
)


def install(cpu: bool):
    """Switch on the shims in SHIMS this machine needs (``cpu``: running with --cpu); ``.revert()`` undoes them."""
    from vaepatch.runs import shims

    return shims.install(shims.needed(cpu, SHIMS))
