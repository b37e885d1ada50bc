"""Efficient-VDVAE's stand-ins and CPU shims, without a clone: each does what its row in the docs says, and
reverting puts back what was there."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from vaepatch.runs.shims import CompatError
from vaepatch.targets.effvdvae import shims, tiny


@pytest.fixture
def missing(monkeypatch):
    """Make the optional packages look absent, so their stand-ins switch on."""
    absent = {"gcsfs", "torch_optimizer", "prettytable", "tensorboard", "torchvision"}
    real = shims.importable
    monkeypatch.setattr(shims, "importable", lambda name: name.split(".")[0] not in absent and real(name))
    return absent


def test_stand_ins_switch_on_for_what_is_missing_and_revert(missing, tmp_path):
    before = {name: sys.modules.get(name) for name in ("gcsfs", "tensorflow", "torch_optimizer", "prettytable")}
    installed = shims.install(cpu=False, data=tiny.make_data(tmp_path, steps=1))
    try:
        assert set(installed.names) == {"gcsfs-stub", "tensorflow-cifar10", "torchvision-transforms",
                                        "torch-optimizer-stub", "prettytable-stub", "tensorboard-stub"}
        import importlib.util

        import tensorflow as tf
        import torch_optimizer
        from torch.utils.tensorboard import SummaryWriter

        assert importlib.util.find_spec("tensorflow").origin is None  # torch's compiler asks for it
        (x_train, y_train), (x_test, y_test) = tf.keras.datasets.cifar10.load_data()
        assert x_train.shape == (2 * tiny.BATCH, 32, 32, 3) and x_train.dtype == np.uint8
        assert y_train.shape == (2 * tiny.BATCH, 1) and x_test.shape == (2 * tiny.N_VAL, 32, 32, 3)
        with pytest.raises(CompatError, match="MNIST loader needs tensorflow"):
            tf.keras.datasets.mnist.load_data()
        with pytest.raises(CompatError, match="pip install torch-optimizer"):
            torch_optimizer.RAdam([torch.zeros(1, requires_grad=True)])
        SummaryWriter("anywhere").add_scalar("x", 1.0, 0)  # takes every call, writes nothing
    finally:
        installed.revert()
    assert {name: sys.modules.get(name) for name in before} == before


def test_the_transforms_stand_in_flips_with_torchs_rng(missing):
    from PIL import Image

    installed = shims.install(cpu=False)
    try:
        import torchvision.transforms as transforms

        image = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
        flip = transforms.Compose([transforms.RandomHorizontalFlip(p=1.0), np.asarray])
        assert np.array_equal(flip(image), np.asarray(image)[:, ::-1])
        torch.manual_seed(0)
        draws = [bool(np.array_equal(transforms.RandomHorizontalFlip()(image), np.asarray(image)))
                 for _ in range(20)]
        torch.manual_seed(0)
        assert draws == [bool(torch.rand(1) >= 0.5) for _ in range(20)]
    finally:
        installed.revert()


def test_without_data_the_cifar10_stand_in_says_to_pass_it():
    installed = shims.install(cpu=False, data=None)
    try:
        import tensorflow as tf

        with pytest.raises(CompatError, match="pass --data DIR"):
            tf.keras.datasets.cifar10.load_data()
    finally:
        installed.revert()


def test_torch_on_cpu_puts_cuda_requests_on_the_cpu(tmp_path):
    proxy = shims._TorchOnCpu()
    assert proxy.zeros(2, device="cuda").device.type == "cpu" and proxy.zeros(2).device.type == "cpu"
    assert proxy.device("cuda") == torch.device("cpu") and proxy.device("cpu") == torch.device("cpu")
    torch.save({"w": torch.ones(1)}, tmp_path / "c")
    assert proxy.load(tmp_path / "c", map_location="cuda:0")["w"].device.type == "cpu"
    assert proxy.nn is torch.nn  # everything else is torch's own


def test_a_device_index_is_the_cpu_only_while_installed():
    real = torch.device
    installed = shims.install_for_load(cpu=True)
    try:
        assert installed.names == ["cpu-device-index"]
        assert torch.device(0) == real("cpu") and torch.device("cpu", 0) == real("cpu", 0)
        assert isinstance(real("cpu"), torch.device)
    finally:
        installed.revert()
    assert torch.device is real
    assert shims.install_for_load(cpu=False).names == []
