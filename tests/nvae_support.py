"""Shared by the NVAE tests: find a usable NVlabs/NVAE clone (or skip saying why and how to get
one), import it in isolation with vaepatch's NVAE shims (vaepatch.targets.nvae.shims), and build a tiny AutoEncoder.

NVAE's top-level module names (``utils``, ``model``, ``datasets``, ...) collide with other
code, openai/vdvae's ``utils`` among them, so :func:`nvae_imported` takes them out of
``sys.modules`` (and the clone off ``sys.path``) again when it is done, putting back whatever
was there before.
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from vaepatch.runs import shims as runs_shims
from vaepatch.targets.nvae import shims as nvae_shims
from vaepatch.targets.nvae import tiny as nvae_tiny
from tests.vdvae_support import usable_clone

# top-level names the NVAE clone defines (modules and packages)
NVAE_ROOTS = ("utils", "model", "distributions", "neural_operations", "neural_ar_operations", "thirdparty",
              "datasets", "lmdb_datasets", "fid", "train", "evaluate")

# The smallest model that still has every NVAE part the patch touches: 2 latent scales x 2 groups
# (the fixed top prior, 3 prior heads, a scale change), NVAE's default cell types (res_bnswish +
# mbconv: both batch norm kinds), squeeze-excitation, 32x32 input (cifar10; NVAE's smallest),
# one pre/post-processing cell, a Normal pixel decoder (num_mixture_dec=1).
TINY_ARGS = dict(dataset="cifar10", use_se=True, res_dist=False, num_x_bits=8, num_latent_scales=2,
                 num_groups_per_scale=2, num_latent_per_group=2, ada_groups=False, min_groups_per_scale=1,
                 num_channels_enc=4, num_channels_dec=4, num_preprocess_blocks=1, num_preprocess_cells=1,
                 num_cell_per_cond_enc=1, num_postprocess_blocks=1, num_postprocess_cells=1,
                 num_cell_per_cond_dec=1, num_mixture_dec=1, num_nf=0)


def nvae_clone():
    """Path of a usable NVlabs/NVAE clone, or None (with the reason) when there is none."""
    return usable_clone("nvae", "NVlabs/NVAE")


def require_nvae():
    path, reason = nvae_clone()
    if path is None:
        pytest.skip(f"SKIPPED, needs a real clone: {reason}")
    return path


def _nvae_entries():
    return {name: module for name, module in sys.modules.items()
            if name.split(".")[0] in NVAE_ROOTS}


@contextlib.contextmanager
def nvae_imported(path):
    """NVAE's ``distributions`` and ``model`` imported from ``path`` with the NVAE shims on (CPU):
    yields a dict with those two modules and ``shims`` (the runs_shims.Installed to revert on exit).

    On exit: vaepatch's NVAE patches reverted, the shims uninstalled, NVAE's modules and the
    clone's sys.path entry removed, and whatever those names were before put back.
    """
    import vaepatch

    saved = _nvae_entries()
    for name in saved:
        del sys.modules[name]
    entry = str(path)
    sys.path.insert(0, entry)
    state = {}  # "shims": the Installed to revert on exit (a test may reinstall and replace it)
    try:
        state["shims"] = runs_shims.install(runs_shims.needed(True, nvae_shims.SHIMS))
        import distributions
        import model
        state.update(distributions=distributions, model=model)
        yield state
    finally:
        vaepatch.revert("nvae")
        if "shims" in state:
            state["shims"].revert()
        for name in _nvae_entries():
            del sys.modules[name]
        sys.modules.update(saved)
        if entry in sys.path:
            sys.path.remove(entry)


def tiny_args(**overrides):
    return nvae_tiny.tiny_args(TINY_ARGS, **overrides)


def tiny_model(seed=0, **overrides):
    """A tiny NVAE AutoEncoder on CPU (in train mode, as upstream's training loop runs it)."""
    return nvae_tiny.tiny_nvae(seed, TINY_ARGS, **overrides)


def cifar_like(batch=2, seed=0):
    """A batch of 8-bit-valued images in [0, 1], shaped like NVAE's cifar10 input."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, 32, 32), generator=g).float() / 255.0


def sync_bn_case():
    """A batch, an upstream gradient and a batch norm with non-trivial affine parameters."""
    torch.manual_seed(0)
    x = 3 * torch.randn(6, 5, 4, 4) + 1
    w = torch.randn(6, 5, 4, 4)
    bn = torch.nn.BatchNorm2d(5, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return x, w, bn


def sync_bn_worker(rank, world, store, queue):
    """One gloo process: vaepatch's CPU batch norm on its share of the batch; results to ``queue``."""
    import torch.distributed as dist

    from vaepatch.targets.nvae.shims import batch_norm_cpu

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, w, bn = sync_bn_case()
        share = x.shape[0] // world
        mine = slice(rank * share, (rank + 1) * share)
        xs = x[mine].clone().requires_grad_()
        out = batch_norm_cpu(bn, xs)
        (out * w[mine]).sum().backward()
        queue.put((rank,) + tuple(t.detach().numpy().copy() for t in
                                  (out, xs.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)))
    finally:
        dist.destroy_process_group()
