"""The conv VAE of Dehaene & Brossard's appendix, overfitting 10 natural crops (their section 7.1).

Encoder Conv 3->16->32->64 (k4 s2 p1, BN+ReLU between), mean and scale-parameter heads
Conv(64->100, k4 s1); decoder ConvT 100->64 (k4 s1), then ConvT 64->32->16->3 (k4 s2 p1, BN+ReLU
between); a Gaussian decoder whose scale is ONE learnable scalar. Images stay on the raw 0..255
scale: the large pixel scale is part of what breaks the naive parameterization. ``vaepatch demo``
and ``vaepatch bench overfit`` train it.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from vaepatch import cifar_format, gaussian, scales

__all__ = ["ConvVAE", "data", "train_one", "Result", "DECODERS", "ENCODERS", "LATENT", "N_IMAGES", "BATCH",
           "DIVERGED"]

LATENT = 100
N_IMAGES = 10
BATCH = 64
DIVERGED = 1e6  # healthy runs end at 1.4e4..7.5e5 nats per image (measured, 300 steps)
FINAL_STEPS = 10  # final loss: mean over the last steps, so one noisy batch does not decide
# Pixels are on 0..255: the paper's bounds for 8-bit data there are alpha = 1/sqrt(12)
# (the quantization noise) and omega = 256 (the whole range).
DECODERS = {"naive_exp": "naive_exp", "exp": "exp", "bounded": "bounded(1/sqrt(12), 256)"}
ENCODERS = {"naive_exp": "naive_exp", "exp": "exp", "explin": "explin", "upbounded1": "upbounded1"}


class ConvVAE(nn.Module):
    """The paper's appendix VAE: 3x32x32 -> q(z|x) over 100x1x1 -> pixel mean and one scale."""

    def __init__(self, encoder: str = "explin", decoder: str = "bounded"):
        super().__init__()
        self.encoder_scale = scales.get(ENCODERS.get(encoder, encoder))
        self.decoder_scale = scales.get(DECODERS.get(decoder, decoder))
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1))
        self.loc_head = nn.Conv2d(64, LATENT, 4, 1)
        self.scale_head = nn.Conv2d(64, LATENT, 4, 1)  # raw parameter of q's scale
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(LATENT, 64, 4, 1),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.ConvTranspose2d(16, 3, 4, 2, 1))
        # one scalar for every pixel, raw 0: sigma starts at 1 for (naive_)exp, ~128 for bounded
        self.raw_pixel_scale = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        h = self.body(x)
        return self.loc_head(h), self.scale_head(h)

    def loss(self, x, eps=None):
        """Negative ELBO per image: -log p(x|z) summed over pixels + KL(q || N(0, 1)) over latents."""
        loc, raw = self.encode(x)
        sigma, log_sigma = self.encoder_scale(raw)
        z = gaussian.rsample(loc, sigma, eps)
        mean = self.decoder(z)
        _, log_pixel_scale = self.decoder_scale(self.raw_pixel_scale)
        nll = -gaussian.log_prob(x, mean, log_pixel_scale).sum(dim=(1, 2, 3))
        kl = gaussian.kl(loc, log_sigma, torch.zeros_like(loc), torch.zeros_like(log_sigma)).sum(dim=(1, 2, 3))
        return (nll + kl).mean()


def data(n: int = N_IMAGES, seed: int = 0) -> torch.Tensor:
    """``n`` natural 32x32 RGB crops as float (n, 3, 32, 32) on 0..255, not normalised on purpose:
    the large pixel scale is part of what breaks the naive parameterization."""
    return torch.from_numpy(cifar_format.crops(n, seed=seed)).permute(0, 3, 1, 2).float().contiguous()


@functools.lru_cache(maxsize=1)
def _images() -> torch.Tensor:
    return data()


@dataclass
class Result:
    encoder: str
    decoder: str
    lr: float
    seed: int
    steps: int
    failed: bool
    reason: str | None  # "nan_loss", "nan_grad", "diverged" or None
    step_failed: int | None
    final_loss: float | None
    seconds: float


def _grad_norm(parameters) -> float:
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def train_one(encoder: str, decoder: str, lr: float, seed: int, steps: int = 300, batch: int = BATCH,
              on_step=None, images: torch.Tensor | None = None) -> Result:
    """Train one VAE with Adam; stop at the first non-finite loss or gradient.

    Each batch samples the 10 images with replacement. Everything random (weights, batches,
    the reparameterization noise) comes from ``seed``, and torch runs on one thread, so a run is
    reproducible from its seed. ``on_step(step, loss, grad_norm, failed_reason, seconds)`` is
    called after every step, the failing one included (``failed_reason`` None while healthy;
    ``seconds`` is that step's wall time, as the launcher's events record it).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = ConvVAE(encoder, decoder)
        images = _images() if images is None else images
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        params = list(model.parameters())
        losses, reason, step_failed = [], None, None
        start = time.perf_counter()
        for step in range(steps):
            step_start = time.perf_counter()
            index = torch.randint(len(images), (batch,), generator=generator)
            eps = torch.randn((batch, LATENT, 1, 1), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(images[index], eps)
            loss.backward()
            value, norm = loss.item(), _grad_norm(params)
            if not math.isfinite(value):
                reason = "nan_loss"
            elif not math.isfinite(norm):
                reason = "nan_grad"
            else:
                optimizer.step()
                losses.append(value)
            if on_step is not None:
                on_step(step, value, norm, reason, time.perf_counter() - step_start)
            if reason is not None:
                step_failed = step
                break
        final = sum(losses[-FINAL_STEPS:]) / len(losses[-FINAL_STEPS:]) if losses else None
        if reason is None and final is not None and final > DIVERGED:
            reason = "diverged"
        return Result(encoder, decoder, lr, seed, steps, reason is not None, reason, step_failed, final,
                      time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
