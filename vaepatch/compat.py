"""Running the 2020 upstreams on today's stack, from outside the clone.

The pinned openai/vdvae breaks on a current machine at a handful of lines (apex import,
numpy >= 1.24, torchvision at module level, and on CPU: ``.cuda()``, ``set_device``,
nccl, DDP ``device_ids``); the pinned NVlabs/NVAE at a few more (tensorboardX, lmdb and
torchvision at module level, ``.cuda()``, batch norms that refuse CPU tensors). Each fix here is a named :class:`Shim` that is switched on only
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

__all__ = ["CompatError", "Shim", "VDVAE_SHIMS", "NVAE_SHIMS", "needed", "install", "Installed"]


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


class _NumpyAcceptingGenerators(types.ModuleType):
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


def _install_vstack() -> Callable[[], None]:
    data = importlib.import_module("data")  # upstream's data.py, already on sys.path
    return _patches(Patch(data, "np", _NumpyAcceptingGenerators()), label="compat numpy-vstack")


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



# -- NVlabs/NVAE -------------------------------------------------------------------------
# The pinned NVAE imports tensorboardX (utils.py), lmdb (lmdb_datasets.py) and torchvision
# (datasets.py, thirdparty/lsun.py, fid/) at module level, subclassing torchvision classes at
# import time; calls .cuda() in model.py, distributions.py, utils.py and neural_ar_operations.py;
# and its batch norms refuse CPU tensors (SyncBatchNormSwish always, nn.SyncBatchNorm once a
# process group exists, which train.py always creates, with nccl, after torch.cuda.set_device).

class _MissingPackage(types.ModuleType):
    """A stand-in for a package that is not installed: any public name is a class.

    The classes can be subclassed (NVAE subclasses ``torchvision.datasets.MNIST`` and others at
    import time), and calling one (building a dataset, a transform, ``lmdb.open``) raises a
    CompatError that says what is missing and how to install it.
    """

    def __init__(self, name: str, message: str):
        super().__init__(name, f"vaepatch stand-in for {name} (see vaepatch.compat)")
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


def _install_tensorboardx() -> Callable[[], None]:
    class SummaryWriter:
        """tensorboardX.SummaryWriter stand-in: takes every call and writes nothing.

        NVAE's logs are for TensorBoard only; vaepatch's launcher records its own per-step events.
        """

        def __init__(self, *args, **kwargs):
            pass

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return lambda *args, **kwargs: None

    SummaryWriter.__module__ = "tensorboardX"
    return _put_modules({"tensorboardX": _stand_in("tensorboardX", SummaryWriter=SummaryWriter)})


def _install_lmdb() -> Callable[[], None]:
    message = ("lmdb is not importable here; NVAE reads celeba, imagenet, ffhq and lsun from LMDB files: "
               "pip install lmdb")
    return _put_modules({"lmdb": _MissingPackage("lmdb", message)})


def _install_torchvision_nvae() -> Callable[[], None]:
    import torch

    message = (f"torchvision is not importable here; NVAE needs it for its datasets, transforms and FID. "
               f"Install the torchvision build that matches torch {torch.__version__}")
    names = ["torchvision", "torchvision.datasets", "torchvision.datasets.vision", "torchvision.datasets.utils",
             "torchvision.transforms", "torchvision.models", "torchvision.models.inception"]
    modules = {name: _MissingPackage(name, message) for name in names}
    modules["torchvision"].__version__ = "0.0"  # fid/inception.py parses it before calling a (stand-in) model
    for name, module in modules.items():
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, module)
    # What NVAE's default dataset needs, working: cifar10 = CIFAR10 + Compose(RandomHorizontalFlip, ToTensor)
    modules["torchvision.datasets"].CIFAR10 = _Cifar10
    for public, transform in (("Compose", _Compose), ("RandomHorizontalFlip", _RandomHorizontalFlip),
                              ("ToTensor", _ToTensor)):
        setattr(modules["torchvision.transforms"], public, transform)
    return _put_modules(modules)


class _Cifar10:
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


class _Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class _RandomHorizontalFlip:
    """Flips a PIL image left-right with probability ``p``, drawing from torch's RNG as torchvision does."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        import torch
        from PIL import Image

        return image.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else image


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


def _batch_norm_cpu(bn, x):
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
    return _patches(Patch(utils, "np", _NumpyAcceptingGenerators()), label="compat numpy-sum-generator")


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
        return swish.apply(_batch_norm_cpu(self, input))

    def wrapper_bn_forward(self, x):
        if x.device.type != "cpu":
            return wrapper_forward(self, x)
        return _batch_norm_cpu(self.bn, x)

    return _patches(Patch(swish_class, "forward", swish_bn_forward), Patch(wrapper_class, "forward", wrapper_bn_forward),
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


NVAE_SHIMS = (
    Shim("tensorboardx-stub", "utils.py: from tensorboardX import SummaryWriter (module level; the stand-in writes nothing)",
         lambda cpu: not _importable("tensorboardX"), _install_tensorboardx),
    Shim("lmdb-stub", "lmdb_datasets.py: import lmdb (module level; used by the celeba/imagenet/ffhq/lsun loaders)",
         lambda cpu: not _importable("lmdb"), _install_lmdb),
    Shim("torchvision-stub-nvae", "datasets.py: class StackedMNIST(dset.MNIST), thirdparty/lsun.py: "
         "class LSUNClass(VisionDataset), fid/inception.py: class FIDInceptionA(torchvision.models.inception.InceptionA) "
         "(torchvision classes subclassed at import time); datasets.py cifar10: CIFAR10, Compose, RandomHorizontalFlip, "
         "ToTensor work (CIFAR-10's python batches read from --data, never downloaded)",
         lambda cpu: not _importable("torchvision"), _install_torchvision_nvae),
    Shim("numpy-sum-generator", "utils.count_parameters_in_M (called by train.py): np.sum of a generator "
         "(deprecated since numpy 1.15, a TypeError now)", lambda cpu: _sum_rejects_generators(), _install_sum),
    Shim("torch-load-namespace", "train.py --cont_training: torch.load of NVAE's checkpoint, which holds its "
         "argparse.Namespace (torch >= 2.6 loads weights only by default: UnpicklingError); Namespace allowed",
         lambda cpu: _load_rejects_namespace(), _install_namespace_load),
    Shim("cpu-cuda-calls", "Tensor.cuda()/Module.cuda() in model.py (sample, spectral_norm_parallel), distributions.py "
         "(DiscMixLogistic.sample), utils.py (kl_balancer_coeff, one_hot), neural_ar_operations.py (ARConv2d mask), train.py",
         _on_cpu, _install_cuda_calls),
    Shim("cpu-sync-batchnorm", "thirdparty/inplaced_sync_batchnorm.py SyncBatchNormSwish.forward: "
         "'SyncBatchNorm expected input tensor to be on GPU'; neural_operations.SyncBatchNorm (nn.SyncBatchNorm) "
         "refuses CPU tensors once a process group exists",
         _on_cpu, _install_sync_batchnorm_cpu),
    Shim("cpu-set-device", "train.py init_processes: torch.cuda.set_device", _on_cpu, _install_set_device),
    Shim("cpu-gloo", "train.py init_processes: dist.init_process_group(backend='nccl')", _on_cpu, _install_gloo),
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
