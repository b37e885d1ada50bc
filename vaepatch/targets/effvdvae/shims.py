"""Efficient-VDVAE on today's stack, and on a CPU: the shims ``vaepatch run effvdvae`` switches on where needed.

Two stages. Before its modules are imported (:func:`install`): stand-ins for packages imported at module
level and used for nothing a run needs (gcsfs, torch_optimizer, prettytable, TensorBoard where they are
missing), torchvision's two transforms where it is missing, and tensorflow, imported only to download
CIFAR-10: its stand-in reads CIFAR-10's python batches from the run's ``--data`` instead. After they are
imported (:func:`install_after_import`, needs the configuration loaded): on CPU, the CUDA-only lines
(``.cuda()``, tensors made on ``'cuda'``, TorchScript's ``calculate_z``, the GPU-count assert, nccl), and
while train.py's module level runs (:func:`install_for_load`), its ``torch.device(local_rank)``.
Each fix is a :class:`vaepatch.runs.shims.Shim`; the clone is never edited.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import types
from typing import Callable

from vaepatch.patching import Patch
from vaepatch.runs.shims import (CompatError, Compose, MissingPackage, RandomHorizontalFlip, Shim, importable,
                                 install_cuda_calls, install_gloo, install_set_device, null_writer, on_cpu, patches,
                                 put_modules, stand_in)

__all__ = ["SHIMS", "BEFORE_IMPORT", "AFTER_IMPORT", "LOAD_SHIMS", "install", "install_after_import",
           "install_for_load"]

_DATA: dict = {"root": None}  # where the tensorflow stand-in reads CIFAR-10 (the run's --data)


def _put(modules: dict) -> Callable[[], None]:
    """put_modules, each stand-in with a module spec (no origin): ``importlib.util.find_spec`` of its name, which
    torch's compiler runs over a list of packages (tensorflow among them) when an optimizer is built, then
    answers instead of raising."""
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return put_modules(modules)


def _missing(name: str, why: str) -> Callable[[], Callable[[], None]]:
    return lambda: _put({name: MissingPackage(name, f"{name} is not importable here; {why}")})


def _load_cifar10():
    """``tf.keras.datasets.cifar10.load_data()``: ((x_train, y_train), (x_test, y_test)), uint8 NHWC, read from
    ``--data`` (CIFAR-10's python batches, as Keras itself reads them after downloading)."""
    import numpy as np

    from vaepatch import cifar_format

    if _DATA["root"] is None:
        raise CompatError("Efficient-VDVAE's CIFAR-10 loader calls tensorflow's load_data, which downloads; "
                          "vaepatch reads the CIFAR-10 python batches from a folder instead: pass --data DIR")
    (train, train_labels), (test, test_labels) = (cifar_format.read(_DATA["root"], split) for split in (True, False))
    return (train, np.asarray(train_labels).reshape(-1, 1)), (test, np.asarray(test_labels).reshape(-1, 1))


def _install_tensorflow() -> Callable[[], None]:
    if importable("tensorboard"):  # its lazy `tf` would pick the stand-in up: resolve it first (to its own stub)
        from tensorboard.compat import tf

        getattr(tf, "io", None)
    message = "vaepatch's tensorflow stand-in only reads CIFAR-10 (Efficient-VDVAE's MNIST loader needs tensorflow)"
    datasets = stand_in("tensorflow.keras.datasets", cifar10=stand_in("cifar10", load_data=_load_cifar10),
                        mnist=MissingPackage("tensorflow.keras.datasets.mnist", message))
    keras = stand_in("tensorflow.keras", datasets=datasets)
    return _put({"tensorflow": stand_in("tensorflow", keras=keras)})


def _install_torchvision() -> Callable[[], None]:
    transforms = MissingPackage("torchvision.transforms", "torchvision is not importable here; vaepatch's stand-in "
                                                          "has only Compose and RandomHorizontalFlip")
    transforms.Compose, transforms.RandomHorizontalFlip = Compose, RandomHorizontalFlip
    return _put({"torchvision": stand_in("torchvision", transforms=transforms), "torchvision.transforms": transforms})


def _install_tensorboard() -> Callable[[], None]:
    writer = null_writer("torch.utils.tensorboard")
    return _put({"torch.utils.tensorboard": stand_in("torch.utils.tensorboard", SummaryWriter=writer)})


BEFORE_IMPORT = (
    Shim("gcsfs-stub", "hparams/hparams.py: import gcsfs (module level; used only to back the config up to Google "
         "Cloud Storage, which train.py never asks for)", lambda cpu: not importable("gcsfs"),
         _missing("gcsfs", "hparams uses it only for a Google Cloud backup: pip install gcsfs")),
    Shim("tensorflow-cifar10", "data/cifar10_data_loader.py: tensorflow imported at module level for "
         "tf.keras.datasets.cifar10.load_data(), which downloads CIFAR-10: the stand-in reads its python batches "
         "from --data (never downloads)", lambda cpu: True, _install_tensorflow),
    Shim("torchvision-transforms", "data/*_data_loader.py: torchvision.transforms imported at module level for "
         "Compose and RandomHorizontalFlip (both work in the stand-in)", lambda cpu: not importable("torchvision"),
         _install_torchvision),
    Shim("torch-optimizer-stub", "model/model.py: import torch_optimizer (module level; used only for "
         "optimizer.type = 'RAdam')", lambda cpu: not importable("torch_optimizer"),
         _missing("torch_optimizer", "Efficient-VDVAE needs it for optimizer.type = 'RAdam': pip install "
                                     "torch-optimizer")),
    Shim("prettytable-stub", "utils/utils.py: from prettytable import PrettyTable (module level; used only by "
         "count_parameters, which train.py never calls)", lambda cpu: not importable("prettytable"),
         _missing("prettytable", "pip install prettytable")),
    Shim("tensorboard-stub", "utils/utils.py: from torch.utils.tensorboard import SummaryWriter (needs the "
         "tensorboard package; the stand-in writes nothing)", lambda cpu: not importable("tensorboard"),
         _install_tensorboard),
)


class _TorchOnCpu(types.ModuleType):
    """torch, except that a tensor or checkpoint asked for on ``'cuda'`` lands on the CPU. Installed only as one
    upstream module's ``torch``, never as torch itself."""

    def __init__(self):
        import torch

        super().__init__("torch")
        self.__torch = torch

    def __getattr__(self, name):
        return getattr(self.__torch, name)

    def _cpu(self, device):
        kind = getattr(device, "type", device)
        return "cpu" if isinstance(kind, str) and kind.startswith("cuda") else device

    def device(self, *args, **kwargs):
        if args and self._cpu(args[0]) == "cpu":
            return self.__torch.device("cpu")
        return self.__torch.device(*args, **kwargs)

    def zeros(self, *args, device=None, **kwargs):
        return self.__torch.zeros(*args, device=self._cpu(device), **kwargs)

    def load(self, f, map_location=None, **kwargs):
        return self.__torch.load(f, map_location="cpu", **kwargs)


def _install_cuda_tensors() -> Callable[[], None]:
    utils, layers = importlib.import_module("utils.utils"), importlib.import_module("model.layers")
    return patches(Patch(utils, "torch", _TorchOnCpu()), Patch(layers, "torch", _TorchOnCpu()),
                   label="compat cpu cuda tensors")


def _install_calculate_z() -> Callable[[], None]:
    import torch

    latent_layers = importlib.import_module("model.latent_layers")

    def calculate_z(mean, std):
        """The draw of upstream's calculate_z, on the mean's device (upstream's asks for 'cuda')."""
        eps = torch.empty_like(mean).normal_(0., 1.)
        return eps * std + mean, mean, std

    return patches(Patch(latent_layers, "calculate_z", calculate_z), label="compat cpu calculate_z")


def _install_gpu_count() -> Callable[[], None]:
    import torch.distributed as dist

    utils = importlib.import_module("utils.utils")

    def assert_processes_and_hparams_gpus_are_equal():
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
        if utils.hparams.run.num_gpus != world:
            raise CompatError(f"run.num_gpus = {utils.hparams.run.num_gpus} in the config, but this CPU run has "
                              f"{world} process(es): set run.num_gpus={world}")

    return patches(Patch(utils, "assert_CUDA_and_hparams_gpus_are_equal", assert_processes_and_hparams_gpus_are_equal),
                   label="compat cpu gpu count")


AFTER_IMPORT = (
    Shim("cpu-cuda-calls", "Tensor.cuda()/Module.cuda() in train.py, model/autoencoder.py (sampling), model/ssim.py, "
         "model/adamax.py, model/layers.py", on_cpu, install_cuda_calls),
    Shim("cpu-cuda-tensors", "utils/utils.py one_hot (and model/autoencoder.py's copy): torch.zeros(device='cuda'); "
         "model/layers.py Unpoolayer.reset_parameters: torch.zeros(device='cuda'); utils/utils.py "
         "load_checkpoint_if_exists: torch.load(map_location='cuda:N'); each lands on the CPU", on_cpu,
         _install_cuda_tensors),
    Shim("cpu-calculate-z", "model/latent_layers.py calculate_z (TorchScript): torch.empty_like(mean, "
         "device=torch.device('cuda')); the same draw on the mean's device", on_cpu, _install_calculate_z),
    Shim("cpu-gpu-count", "utils/utils.py assert_CUDA_and_hparams_gpus_are_equal (train.py, module level): "
         "run.num_gpus == torch.cuda.device_count(), 0 on a CPU; checked against the number of processes",
         on_cpu, _install_gpu_count),
    Shim("cpu-set-device", "train.py: torch.cuda.set_device(local_rank)", on_cpu, install_set_device),
    Shim("cpu-gloo", "train.py: dist.init_process_group(backend='nccl')", on_cpu, install_gloo),
)
def _install_index_device() -> Callable[[], None]:
    import torch

    real = torch.device

    class _DeviceType(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, real)

        def __call__(cls, *args, **kwargs):
            if len(args) == 1 and not kwargs and isinstance(args[0], int):  # torch.device(local_rank)
                return real("cpu")
            return real(*args, **kwargs)

    class device(metaclass=_DeviceType):  # noqa: N801 - torch's name
        """torch.device, except that a bare device index is the CPU (while train.py's module level runs)."""

    return patches(Patch(torch, "device", device), label="compat cpu device index")


# Switched on only while train.py's module level runs (the launcher's load_script), then off again.
LOAD_SHIMS = (
    Shim("cpu-device-index", "train.py: device = torch.device(local_rank), a CUDA device (torch raises without "
         "one), for the model and every batch: a bare index means the CPU while train.py's module level runs",
         on_cpu, _install_index_device),
)
SHIMS = BEFORE_IMPORT + AFTER_IMPORT + LOAD_SHIMS


def install(cpu: bool, data=None):
    """The stand-ins this machine needs to import Efficient-VDVAE (``data``: where the tensorflow stand-in reads
    CIFAR-10); ``.revert()`` undoes them."""
    from vaepatch.runs import shims

    _DATA["root"] = data
    return shims.install(shims.needed(cpu, BEFORE_IMPORT))


def install_after_import(cpu: bool):
    """The shims on Efficient-VDVAE's imported modules (``cpu``: running with --cpu); ``.revert()`` undoes them."""
    from vaepatch.runs import shims

    return shims.install(shims.needed(cpu, AFTER_IMPORT))


def install_for_load(cpu: bool):
    """The shims train.py's module level needs (a device index on CPU); revert them once it has run."""
    from vaepatch.runs import shims

    return shims.install(shims.needed(cpu, LOAD_SHIMS))
