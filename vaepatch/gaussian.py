"""Normal-distribution math on (loc, log_scale), never through log(exp(.)) or log of a ratio.

The KL between N(m1, s1) and N(m2, s2), with l = log s and D = l1 - l2, is written as

    KL = -D + expm1(2 D) / 2 + ((m1 - m2) exp(-l2))^2 / 2

which equals the textbook ``l2 - l1 + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2`` but needs no
scale (so no underflow to 0), no log (so no -inf), no cancellation near s1 = s2 (expm1),
and no separate exp(-2 l2) that overflows before the product it multiplies does.
"""
from __future__ import annotations

import math

import torch
from torch.distributions import Normal, constraints, register_kl

from vaepatch.precision import float32_math

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _inv_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """exp(-log_scale), capped just below the dtype's largest finite value.

    Beyond the cap the factor only ever multiplies a location difference, and without
    it a difference of exactly 0 times inf would be NaN (in the value and the gradient).
    The bound is log(max) lowered by 2 eps relative: log(max) itself, once rounded to the
    dtype, has an exp that rounds to inf in float32 and float16.
    """
    if log_scale.is_floating_point():
        finfo = torch.finfo(log_scale.dtype)
        limit = math.log(finfo.max) * (1.0 - 2.0 * finfo.eps)
    else:
        limit = 80.0
    return torch.exp(-torch.clamp(log_scale, min=-limit))


@float32_math
def kl(loc1, log_scale1, loc2, log_scale2):
    """KL(N(loc1, exp(log_scale1)) || N(loc2, exp(log_scale2))), elementwise.

    16-bit inputs are computed in float32 (``vaepatch.precision``): in float16, exp(-log_scale)
    overflows for log_scale < -11.1 although (loc1 - loc2)^2 exp(-2 log_scale) is often representable.
    """
    delta = log_scale1 - log_scale2
    d = (loc1 - loc2) * _inv_scale(log_scale2)
    return 0.5 * torch.expm1(2.0 * delta) - delta + 0.5 * d * d


@float32_math
def log_prob(x, loc, log_scale):
    """log N(x; loc, exp(log_scale)), elementwise (16-bit inputs computed in float32)."""
    z = (x - loc) * _inv_scale(log_scale)
    return -0.5 * z * z - log_scale - HALF_LOG_2PI


def rsample(loc, scale, eps=None):
    """Reparameterized draw loc + scale * eps (eps ~ N(0, 1) unless given)."""
    if eps is None:
        eps = torch.randn_like(loc)
    return loc + scale * eps


def entropy(log_scale):
    """Differential entropy of N(., exp(log_scale))."""
    return log_scale + (0.5 + HALF_LOG_2PI)


class StableNormal(Normal):
    """A ``torch.distributions.Normal`` that also carries an exact ``log_scale``.

    Build it from a raw network output with any vaepatch parameterization:

    >>> q = StableNormal.from_raw(loc, raw, "upbounded1")
    >>> p = StableNormal.from_raw(torch.zeros_like(loc), torch.zeros_like(raw), "cst1")
    >>> torch.distributions.kl_divergence(q, p)   # the stable KL, via register_kl

    ``log_prob`` and ``entropy`` use ``log_scale``; argument validation is off because a
    scale that underflows to 0 is still a valid distribution here (its log_scale is finite).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.nonnegative}

    def __init__(self, loc, scale, log_scale, validate_args=False):
        super().__init__(loc, scale, validate_args=validate_args)
        self.log_scale = log_scale.expand(self.loc.shape) if log_scale.shape != self.loc.shape else log_scale

    @classmethod
    def from_raw(cls, loc, raw, scale="exp"):
        """N(loc, sigma(raw)) where sigma is ``vaepatch.scales.get(scale)``."""
        from vaepatch import scales

        sigma, log_sigma = scales.get(scale)(raw)
        return cls(loc, sigma, log_sigma)

    @classmethod
    def from_log_scale(cls, loc, log_scale):
        return cls(loc, torch.exp(log_scale), log_scale)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return StableNormal(self.loc.expand(shape), self.scale.expand(shape), self.log_scale.expand(shape))

    def log_prob(self, value):
        return log_prob(value, self.loc, self.log_scale)

    def entropy(self):
        return entropy(self.log_scale)


def _log_scale_of(d):
    return d.log_scale if isinstance(d, StableNormal) else torch.log(d.scale)


@register_kl(StableNormal, StableNormal)
def _kl_stable_stable(p, q):
    return kl(p.loc, p.log_scale, q.loc, q.log_scale)


@register_kl(StableNormal, Normal)
def _kl_stable_normal(p, q):
    return kl(p.loc, p.log_scale, q.loc, _log_scale_of(q))


@register_kl(Normal, StableNormal)
def _kl_normal_stable(p, q):
    return kl(p.loc, _log_scale_of(p), q.loc, q.log_scale)
