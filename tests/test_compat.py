"""Each compat shim on its own: switched on only when needed, does its one job, restores exactly."""
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from vaepatch.runs import shims as runs_shims
from vaepatch.targets.vdvae import shims as vdvae_shims
from vaepatch.targets.nvae import shims as nvae_shims


def _shim(name):
    return next(s for s in vdvae_shims.SHIMS if s.name == name)


def test_needed_on_this_machine_follows_the_checks():
    cpu_names = {s.name for s in runs_shims.needed(True, vdvae_shims.SHIMS)}
    gpu_names = {s.name for s in runs_shims.needed(False, vdvae_shims.SHIMS)}
    assert {"cpu-cuda-calls", "cpu-set-device", "cpu-gloo", "cpu-ddp-device-ids"} <= cpu_names
    assert not any(n.startswith("cpu-") for n in gpu_names)
    assert ("apex-fusedadam" in gpu_names) == (not runs_shims.importable("apex.optimizers"))
    assert ("numpy-vstack-generator" in gpu_names) == (tuple(map(int, np.__version__.split(".")[:2])) >= (1, 24))


def test_apex_stand_in_is_adamw_and_steps_identically():
    undo = _shim("apex-fusedadam").install()
    try:
        from apex.optimizers import FusedAdam

        torch.manual_seed(0)
        a = torch.nn.Linear(5, 3)
        b = torch.nn.Linear(5, 3)
        b.load_state_dict(a.state_dict())
        opt_a = FusedAdam(a.parameters(), weight_decay=0.01, lr=0.1, betas=(0.9, 0.9))
        opt_b = torch.optim.AdamW(b.parameters(), weight_decay=0.01, lr=0.1, betas=(0.9, 0.9))
        x = torch.randn(8, 5)
        for _ in range(3):
            for model, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                model(x).pow(2).sum().backward()
                opt.step()
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        with pytest.raises(runs_shims.CompatError, match="adam_w_mode"):
            FusedAdam(a.parameters(), adam_w_mode=False)
    finally:
        undo()
    assert "apex" not in sys.modules or not getattr(sys.modules["apex"], "__vaepatch_stand_in__", False)


def test_torchvision_stand_in_imports_but_says_what_is_missing_when_used():
    before = sys.modules.get("torchvision")
    undo = _shim("torchvision-stub").install()
    try:
        from torchvision.datasets import ImageFolder
        import torchvision.transforms as transforms

        with pytest.raises(runs_shims.CompatError, match=r"torchvision.*torch " + torch.__version__.split("+")[0]):
            ImageFolder("x", transforms.ToTensor())
    finally:
        undo()
    assert sys.modules.get("torchvision") is before


def test_tensorboard_stand_ins_take_every_call_and_are_put_back(tmp_path):
    """NVAE's tensorboardX and Efficient-VDVAE's torch.utils.tensorboard stand-ins: named as the real class's
    module, every method a no-op returning None, no file written, dunders still raise (copy and pickle
    look those up), and the modules they replaced are back after uninstall."""
    from vaepatch.targets.effvdvae import shims as effvdvae_shims

    for shim, module in ((nvae_shims.SHIMS, "tensorboardX"), (effvdvae_shims.SHIMS, "torch.utils.tensorboard")):
        before = sys.modules.get(module)
        uninstall = next(s for s in shim if s.name.startswith("tensorboard")).install()
        try:
            writer_class = sys.modules[module].SummaryWriter
            writer = writer_class(log_dir=str(tmp_path / "tb"), flush_secs=20)
            assert writer_class.__module__ == module
            assert writer.add_scalar("loss", 1.0, 0) is None and writer.close() is None
            with pytest.raises(AttributeError):
                writer.__deepcopy__
        finally:
            uninstall()
        assert sys.modules.get(module) is before
    assert not (tmp_path / "tb").exists()


def test_a_module_that_fails_to_import_counts_as_absent_and_is_cleaned_up(tmp_path, monkeypatch):
    pkg = tmp_path / "brokenvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import ops\n")
    (pkg / "ops.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert runs_shims.importable("brokenvision") is False
    assert not [m for m in sys.modules if m.startswith("brokenvision")]
    assert runs_shims.importable("json") is True


def test_vstack_proxy_accepts_generators_and_is_numpy_otherwise():
    proxy = runs_shims.NumpyAcceptingGenerators()
    rows = [np.arange(3), np.arange(3, 6)]
    assert np.array_equal(proxy.vstack(r for r in rows), np.vstack(rows))
    assert np.array_equal(proxy.vstack(rows), np.vstack(rows))
    assert proxy.asarray is np.asarray and proxy.float32 is np.float32
    assert proxy.sum(x for x in (1, 2, 3)) == 6 and proxy.sum(np.ones((2, 2)), axis=0).tolist() == [2.0, 2.0]
    if vdvae_shims._vstack_rejects_generators():
        with pytest.raises(TypeError):
            np.vstack(r for r in rows)  # the upstream line this shim exists for


def test_vstack_shim_patches_only_the_upstream_data_module(monkeypatch):
    data = types.ModuleType("data")
    data.np = np
    monkeypatch.setitem(sys.modules, "data", data)
    undo = _shim("numpy-vstack-generator").install()
    try:
        assert isinstance(data.np, runs_shims.NumpyAcceptingGenerators)
        assert data.np.vstack(r for r in ([1, 2], [3, 4])).shape == (2, 2)
        assert sys.modules["numpy"] is np  # numpy itself is untouched
    finally:
        undo()
    assert data.np is np


def test_cuda_calls_become_no_ops_and_are_restored():
    tensor_cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    undo = _shim("cpu-cuda-calls").install()
    try:
        x = torch.ones(3)
        assert x.cuda(non_blocking=True) is x and x.cuda(0) is x
        layer = torch.nn.Linear(2, 2)
        assert layer.cuda(0) is layer and layer.weight.device.type == "cpu"
    finally:
        undo()
    assert torch.Tensor.cuda is tensor_cuda and torch.nn.Module.cuda is module_cuda


def test_set_device_is_a_no_op_and_restored():
    original = torch.cuda.set_device
    undo = _shim("cpu-set-device").install()
    try:
        assert torch.cuda.set_device(3) is None
    finally:
        undo()
    assert torch.cuda.set_device is original


def test_nccl_becomes_gloo(tmp_path):
    original = dist.init_process_group
    undo = _shim("cpu-gloo").install()
    try:
        dist.init_process_group(backend="nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            assert dist.get_backend() == "gloo"
            t = torch.ones(2)
            dist.all_reduce(t)
            assert torch.equal(t, torch.ones(2))
        finally:
            dist.destroy_process_group()
    finally:
        undo()
    assert dist.init_process_group is original


def test_ddp_shim_drops_device_ids_only(monkeypatch):
    calls = []

    def fake_ddp(module, *args, **kwargs):
        calls.append((module, args, kwargs))
        return module

    helpers = types.ModuleType("train_helpers")
    helpers.DistributedDataParallel = fake_ddp
    monkeypatch.setitem(sys.modules, "train_helpers", helpers)
    undo = _shim("cpu-ddp-device-ids").install()
    try:
        model = torch.nn.Linear(2, 2)
        assert helpers.DistributedDataParallel(model, device_ids=[0], output_device=0, find_unused_parameters=True) is model
        assert calls == [(model, (), {"find_unused_parameters": True})]
    finally:
        undo()
    assert helpers.DistributedDataParallel is fake_ddp


def test_install_is_all_or_nothing():
    undone = []

    def ok():
        return lambda: undone.append("ok")

    def broken():
        raise RuntimeError("boom")

    shims = [runs_shims.Shim("ok", "", lambda cpu: True, ok), runs_shims.Shim("broken", "", lambda cpu: True, broken)]
    with pytest.raises(RuntimeError, match="boom"):
        runs_shims.install(shims)
    assert undone == ["ok"]
    done = runs_shims.install(shims[:1])
    assert done.names == ["ok"]
    done.revert()
    done.revert()  # idempotent
    assert undone == ["ok", "ok"]


def test_namespace_load_shim_lets_nvae_checkpoints_load_and_undoes_exactly():
    import argparse
    import io

    from torch import serialization

    def load_namespace():
        buffer = io.BytesIO()
        torch.save({"args": argparse.Namespace(seed=3)}, buffer)
        buffer.seek(0)
        return torch.load(buffer, map_location="cpu")["args"]

    if not nvae_shims._load_rejects_namespace():
        pytest.skip("this torch loads an argparse.Namespace by default: the shim is not needed here")
    with pytest.raises(Exception, match="Namespace"):
        load_namespace()
    undo = nvae_shims._install_namespace_load()
    try:
        assert load_namespace() == argparse.Namespace(seed=3)
        assert nvae_shims._load_rejects_namespace()  # installed, the machine still needs it
        before_undo = list(serialization.get_safe_globals())
    finally:
        undo()
    # the allow-list is a set (its listing order is not stable): everything but Namespace stays
    assert set(serialization.get_safe_globals()) == {g for g in before_undo if g is not argparse.Namespace}
    with pytest.raises(Exception, match="Namespace"):
        load_namespace()
