"""OU-smoothed priors between VDVAE's decoder blocks (Pervez & Gavves), from VDVAE's own modules.

Each block's prior p(z_i | z_{i+1}) is VDVAE's prior head applied to the block's input. That input
depends on the previous block's latent through the previous block's ``z_fn`` and ``resnet`` (and, at
a new resolution, this block's mixin upsampling). :func:`smoothed_prior` redoes that path for K
OU-correlated copies of the previous latent and averages the prior's mean and log-scale
(log-mean-exp of sigma) over them; ``patch.py`` calls it inside ``DecBlock.sample``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vaepatch import ou

__all__ = ["split_prior", "OUSource", "smoothed_prior"]


def split_prior(block, x):
    """The prior head's output as (mean, raw scale, residual features)."""
    feats = block.prior(x)
    z = block.zdim
    return torch.split(feats, [z, z, feats.shape[1] - 2 * z], dim=1)


class OUSource:
    """What a block leaves for the next one: how to redo its output for another latent."""

    def __init__(self, block, x, z, loc, scale):
        self.block, self.x, self.z, self.loc, self.scale = block, x, z, loc, scale

    def output(self, z):
        """The block's output (what its forward writes to xs) for latent ``z`` (any batch multiple)."""
        repeats = z.shape[0] // self.x.shape[0]
        return self.block.resnet(self.x.repeat(repeats, 1, 1, 1) + self.block.z_fn(z))


def _upsample(block, features, width):
    return F.interpolate(features[:, :width], scale_factor=block.base // block.mixin)


def smoothed_prior(block, x, source, ou_option, prior, eps=None):
    """(mean, log scale) of ``block``'s prior averaged over K OU copies of the previous latent.

    ``x`` is the block's real input. Returns None when the block's input does not depend on the
    previous block (a new resolution without a mixin from it). The scale is averaged in
    log space (log-mean-exp), so a tiny sigma never goes through log(exp(.)).
    """
    previous = source.block
    if block.mixin is None and previous.base != block.base:
        return None
    if block.mixin is not None and block.mixin != previous.base:
        return None
    samples = ou_option.samples
    copies = ou.correlated(source.z, source.loc, source.scale, ou_option.rho, samples, eps)
    out = source.output(copies.flatten(0, 1))
    if block.mixin is None:
        x_in = out
    else:  # x = (this resolution's own state) + upsampled previous output: swap only the latter
        with torch.no_grad():
            own = x - _upsample(block, source.output(source.z), x.shape[1])
        x_in = own.repeat(samples, 1, 1, 1) + _upsample(block, out, x.shape[1])
    pm, pv, _ = split_prior(block, x_in)
    _, log_scale = prior(pv)
    unflatten = lambda t: t.reshape(samples, -1, *t.shape[1:])  # noqa: E731
    return unflatten(pm).mean(0), torch.logsumexp(unflatten(log_scale), 0) - math.log(samples)
