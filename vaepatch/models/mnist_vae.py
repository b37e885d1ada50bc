"""The shallow MNIST VAE of Dehaene & Brossard's section 7.2, whose decoder learns its variance.

Encoder 784-128-ReLU-256 -> (mean, raw scale) of a 128-d q(z|x), scale ``upbounded1``; decoder
128-128-ReLU -> per-pixel mean mu (sigmoid or identity) and, per pixel, the raw parameter p of the
Normal's scale gamma, turned into (gamma, log gamma) by a vaepatch scale spec. A spec written
``global:SPEC`` is the paper's Global row: ONE learnable p for every pixel and every input.
``naive_exp`` takes log gamma as log(exp(p)) numerically, so its failure shows.
"""
from __future__ import annotations

import torch
from torch import nn

from vaepatch import gaussian, scales

__all__ = ["VAE", "MUS", "PIXELS", "LATENT", "GLOBAL", "scale_spec"]

MUS = ["sigmoid", "identity"]
PIXELS = 28 * 28
LATENT = 128
GLOBAL = "global:"


def scale_spec(text: str) -> str:
    """The canonical spec of a decoded scale, ``global:`` prefix kept; ValueError names a bad one."""
    text = text.strip()
    if text.startswith(GLOBAL):
        return GLOBAL + scales.get(text[len(GLOBAL):]).spec
    return scales.get(text).spec


class VAE(nn.Module):
    """The section 7.2 VAE; ``scale`` is a vaepatch spec, ``global:SPEC`` for one shared scale."""

    def __init__(self, mu: str = "sigmoid", scale: str = "bounded"):
        super().__init__()
        if mu not in MUS:
            raise ValueError(f"mu must be one of {MUS}, got {mu!r}")
        spec = scale_spec(scale)
        self.mu, self.shared = mu, spec.startswith(GLOBAL)
        self.scale = scales.get(spec[len(GLOBAL):] if self.shared else spec)
        self.q_scale = scales.get("upbounded1")
        self.encoder = nn.Sequential(nn.Linear(PIXELS, 128), nn.ReLU(), nn.Linear(128, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, 128), nn.ReLU(),
                                     nn.Linear(128, PIXELS if self.shared else 2 * PIXELS))
        self.raw_global = nn.Parameter(torch.zeros(())) if self.shared else None

    @property
    def spec(self) -> str:
        return (GLOBAL if self.shared else "") + self.scale.spec

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None):
        """(negative ELBO per image, decoded log gamma): -log N(x | mu, gamma) over pixels + KL(q || N(0, 1)),
        one z sample."""
        z_loc, z_raw = self.encoder(x).chunk(2, dim=1)
        z_scale, z_log_scale = self.q_scale(z_raw)
        z = gaussian.rsample(z_loc, z_scale, eps)
        out = self.decoder(z)
        loc, raw = (out, self.raw_global) if self.shared else out.chunk(2, dim=1)
        if self.mu == "sigmoid":
            loc = torch.sigmoid(loc)
        _, log_scale = self.scale(raw)
        zero = torch.zeros((), dtype=x.dtype)
        kl = gaussian.kl(z_loc, z_log_scale, zero, zero).sum(1)
        nll = -gaussian.log_prob(x, loc, log_scale.expand_as(loc)).sum(1)
        return nll + kl, log_scale

    def nelbo(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self(x, eps)[0]
