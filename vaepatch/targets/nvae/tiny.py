"""A tiny NVlabs/NVAE built by NVAE's own code, and one training step as its train.py takes it: what
the tests and the CPU benches (step time, OU cost) train and time.

The model: ``model.AutoEncoder`` with NVAE's default cells (``res_mbconv``), cifar10 32x32, 2 latent
scales x 2 groups of 4 latents, 16 channels, one cell per block, with the CIFAR-10 flags of NVAE's
README (squeeze-excitation, residual posterior, one flow), batch 8. NVAE's top-level modules
(``utils``, ``model``, ...) clash with openai/vdvae's: use it in an interpreter of its own.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from vaepatch import cifar_format

__all__ = ["TINY_ARGS", "ARCH", "BATCH", "ADAMAX", "SKIP_POLICIES", "nvae_on_cpu", "tiny_args", "tiny_nvae", "batch",
           "train_step", "training_loss"]

# NVAE's own argument names (train.py), made small; with the CIFAR-10 flags of its README
# (--use_se --res_dist --num_nf 1 --weight_decay_norm 1e-2).
TINY_ARGS = dict(dataset="cifar10", use_se=True, res_dist=True, num_x_bits=8, num_latent_scales=2,
                 num_groups_per_scale=2, num_latent_per_group=4, ada_groups=False, min_groups_per_scale=1,
                 num_channels_enc=16, num_channels_dec=16, num_preprocess_blocks=1, num_preprocess_cells=1,
                 num_cell_per_cond_enc=1, num_postprocess_blocks=1, num_postprocess_cells=1,
                 num_cell_per_cond_dec=1, num_mixture_dec=10, num_nf=1)
ARCH = "res_mbconv"  # NVAE's default --arch_instance
BATCH = 8
WEIGHT_DECAY_NORM = 1e-2  # NVAE README's CIFAR-10 command
NOMINAL_ITERS = 1000  # kl_coeff(i) as at step i of a run this long (train.py: anneal 30%, const 0.01%)
KL_ANNEAL_PORTION, KL_CONST_PORTION, KL_CONST_COEFF = 0.3, 0.0001, 0.0001  # train.py's defaults
ADAMAX = dict(lr=1e-4, weight_decay=3e-4, eps=1e-3)  # train.py's weight decay and eps


@contextlib.contextmanager
def nvae_on_cpu():
    """The NVAE clone first on sys.path and the compat shims this machine needs installed (CPU);
    on exit vaepatch's NVAE patches are reverted and the shims uninstalled. NVAE's modules stay
    imported: one upstream per interpreter."""
    from vaepatch import upstream
    from vaepatch.api import revert
    from vaepatch.targets.nvae.shims import install as install_shims

    path = upstream.require("nvae", why="nvae-step-time times the real NVlabs/NVAE.")
    upstream.add_to_path(path)
    shims = install_shims(cpu=True)
    try:
        yield path
    finally:
        revert("nvae")
        shims.revert()


def tiny_args(base=None, **overrides):
    """NVAE's parsed-argument namespace: ``base`` (default :data:`TINY_ARGS`) with ``overrides``."""
    base = TINY_ARGS if base is None else base
    unknown = set(overrides) - set(base)
    if unknown:
        raise TypeError(f"unknown NVAE args {sorted(unknown)}")
    return argparse.Namespace(**{**base, **overrides})


def tiny_nvae(seed=0, base=None, **overrides):
    """NVAE's ``model.AutoEncoder`` for :func:`tiny_args`, seeded, in train mode (needs the clone imported)."""
    import model
    import utils

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(None):  # AutoEncoder prints its layer counts
        m = model.AutoEncoder(tiny_args(base, **overrides), None, utils.get_arch_cells(ARCH))
    return m.train()


def batch(n=BATCH, seed=0):
    """``n`` natural 32x32 crops in NVAE's cifar10 input convention: (N, 3, 32, 32) in [0, 1] through
    ``utils.pre_process``."""
    import utils

    x = torch.from_numpy(cifar_format.crops(n, seed=seed)).permute(0, 3, 1, 2).float() / 255.0
    return utils.pre_process(x, TINY_ARGS["num_x_bits"])


def train_step(model, optimizer, x, alpha_i, global_step):
    """One NVAE training step (train.py's, on CPU in float32): (seconds, loss)."""
    optimizer.zero_grad()
    t0 = time.perf_counter()
    loss = training_loss(model, x, alpha_i, global_step)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0, loss.item()


def training_loss(model, x, alpha_i, global_step):
    """The loss train.py back-propagates at ``global_step``: the forward of :func:`train_step`."""
    import utils

    logits, log_q, log_p, kl_all, kl_diag = model(x)
    output = model.decoder_output(logits)
    kl_coeff = utils.kl_coeff(global_step, KL_ANNEAL_PORTION * NOMINAL_ITERS, KL_CONST_PORTION * NOMINAL_ITERS,
                              KL_CONST_COEFF)
    recon_loss = utils.reconstruction_loss(output, x, crop=model.crop_output)
    balanced_kl, kl_coeffs, kl_vals = utils.kl_balancer(kl_all, kl_coeff, kl_balance=True, alpha_i=alpha_i)
    loss = torch.mean(recon_loss + balanced_kl)
    norm_loss = model.spectral_norm_parallel()
    bn_loss = model.batchnorm_loss()
    return loss + norm_loss * WEIGHT_DECAY_NORM + bn_loss * WEIGHT_DECAY_NORM


# NVAE's smallest model through its own train.py: 4 channels, 2 scales x 2 groups of 2 latents, one
# cell per block, squeeze-excitation, NVAE's default pixels (10 discretized logistics), batch 8.
TRAIN_BATCH = 8
TRAIN_ARGS = ["--dataset", "cifar10", "--batch_size", str(TRAIN_BATCH), "--num_channels_enc", "4",
              "--num_channels_dec", "4",
              "--num_latent_scales", "2", "--num_groups_per_scale", "2", "--num_latent_per_group", "2",
              "--num_preprocess_blocks", "1", "--num_preprocess_cells", "1", "--num_postprocess_blocks", "1",
              "--num_postprocess_cells", "1", "--use_se"]
# The stability-margin bench's skip policies. NVAE has no skip rule of its own: every update is
# applied (only AMP's GradScaler skips a step with non-finite gradients, on CUDA), so "off" is the
# same run as "upstream".
SKIP_POLICIES = {"upstream": []}


def make_data(dest, steps: int, batch_size: int = TRAIN_BATCH):
    """A CIFAR-format dataset whose one epoch is longer than ``steps`` batches, so a run stopped at
    --max-steps never reaches NVAE's end-of-epoch evaluation."""
    from pathlib import Path

    if not (Path(dest) / cifar_format.FOLDER / "test_batch").exists():
        cifar_format.make(dest, n_train=batch_size * (steps + 1), n_test=8, for_target="nvae")
    return Path(dest)


def run_args(run_dir, data, seed: int, lr: float, port: int) -> tuple[list, list]:
    """(``vaepatch run nvae`` options, train.py arguments) for the tiny model at ``lr``: one epoch
    (its KL annealing spans the run), no warm-up, its own checkpoint folder and port."""
    return ["--master-port", str(port)], [*TRAIN_ARGS, "--learning_rate", repr(float(lr)), "--seed", str(seed),
                                          "--data", str(data), "--root", str(run_dir / "nvae"), "--save", "run",
                                          "--epochs", "1", "--warmup_epochs", "0"]
