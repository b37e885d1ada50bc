"""A tiny configuration of the real openai/vdvae (width 32, zdim 8, one block per resolution,
batch 16, 32x32), built by VDVAE's own code: what the tests and the CPU benches train and time;
and upstream's full ``--hps cifar10`` model (:func:`cifar10_vae`) for the GPU check.
Needs the clone on ``sys.path`` (``vaepatch.apply`` or ``upstream.add_to_path`` puts it there).
"""
from __future__ import annotations

import argparse

import torch

from vaepatch import cifar_format

__all__ = ["ONE_BLOCK_PER_RESOLUTION", "TRAIN_ARGS", "SKIP_POLICIES", "threshold_args", "TINY", "cifar10_hparams",
           "tiny_hparams", "tiny_vae", "cifar10_vae", "batch"]

ONE_BLOCK_PER_RESOLUTION = dict(
    dec_blocks="1x1,4m1,8m4,16m8,32m16",
    enc_blocks="32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1",
)
# The same kind of model as train.py arguments (one more block per resolution in the decoder),
# for runs through `vaepatch run vdvae` (the stress and stability-margin benches).
TRAIN_ARGS = ["--hps", "cifar10", "--width", "32", "--zdim", "8", "--n_batch", "16",
              "--dec_blocks", "1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16,32x1",
              "--enc_blocks", "32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1"]
# The stability-margin bench's skip policies: train.py arguments for each. VDVAE skips an update
# whose gradient norm exceeds --skip_threshold (400 for cifar10); -1 turns that rule off (upstream's
# own setting). VDVAE's train.py never applies a step whose loss is NaN; with the rule off it does apply
# one whose loss is infinite (it checks only isnan; an inf loss was skipped through its gradient norm).
SKIP_POLICIES = {"upstream": [], "off": ["--skip_threshold", "-1"]}


def threshold_args(threshold: float) -> list:
    """train.py arguments that skip an update whose gradient norm exceeds ``threshold`` (the skip-counts bench's
    calibrated rule)."""
    return ["--skip_threshold", repr(threshold)]
TINY = dict(width=32, zdim=8, n_batch=16, **ONE_BLOCK_PER_RESOLUTION)


def tiny_hparams(**overrides):
    """Upstream's own hyperparameters for ``--hps cifar10``, made tiny, parsed by upstream's hps.py."""
    return cifar10_hparams(**{**TINY, **overrides})


def cifar10_hparams(**settings):
    """Upstream's own hyperparameters for ``--hps cifar10`` (full size: width 384, 43 decoder blocks,
    batch 16) with ``settings`` on top, parsed by upstream's hps.py."""
    import hps  # from the clone on sys.path

    argv = ["--hps", "cifar10"] + [f"--{k}={v}" for k, v in settings.items()]
    parser = argparse.ArgumentParser()
    hps.add_vae_arguments(parser)
    H = hps.Hyperparams()
    hps.parse_args_and_update_hparams(H, parser, s=argv)
    H.update(image_size=32, image_channels=3)  # set by upstream's data setup, not by its arguments
    return H


def tiny_vae(seed=0, **overrides):
    """(H, vae.VAE(H)) for :func:`tiny_hparams`, weights drawn from ``seed``."""
    return _vae(tiny_hparams(**overrides), seed)


def cifar10_vae(seed=0, **overrides):
    """(H, vae.VAE(H)) for upstream's full ``--hps cifar10`` (:func:`cifar10_hparams`), weights from ``seed``."""
    return _vae(cifar10_hparams(**overrides), seed)


def _vae(H, seed):
    import vae

    torch.manual_seed(seed)
    return H, vae.VAE(H)


def batch(n, seed=0):
    """``n`` natural 32x32 crops in VDVAE's input convention: (N, H, W, C) in [-1, 1]; input and target."""
    images = torch.from_numpy(cifar_format.crops(n, seed=seed)).float()
    x = images / 127.5 - 1.0
    return x, x.clone()


def make_data(dest, steps: int, batch_size: int = 16):
    """A CIFAR-format dataset (``vaepatch make-data``) with one epoch longer than ``steps`` batches,
    so a run stopped at --max-steps never reaches VDVAE's end-of-epoch evaluation."""
    from pathlib import Path

    if not (Path(dest) / cifar_format.FOLDER / "test_batch").exists():
        cifar_format.make(dest, n_train=cifar_format.VALIDATION_HOLDOUT + batch_size * (steps + 1), n_test=100)
    return Path(dest)


def run_args(run_dir, data, seed: int, lr: float, port: int) -> tuple[list, list]:
    """(``vaepatch run vdvae`` options, train.py arguments) for the tiny model at ``lr``: its own
    save dir and process-group port, no sample images."""
    return [], [*TRAIN_ARGS, "--lr", repr(float(lr)), "--seed", str(seed), "--data_root", str(data),
                "--save_dir", str(run_dir / "vdvae"), "--desc", "run", "--port", str(port),
                "--iters_per_images", "1000000"]
