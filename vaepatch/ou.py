"""The Ornstein-Uhlenbeck semigroup, by Monte Carlo: correlated draws and smoothing of a function.

Pervez & Gavves (ICML 2021) train a hierarchical VAE's prior p(z_i | z_{i+1}) with its mean and
scale replaced by their OU-smoothed versions U_ρμ and U_ρσ, where, for z drawn from N(m, s),

    U_ρ f(z) = E_ε[ f(ρ z + (1 − ρ) m + s √(1 − ρ²) ε) ],   ε ~ N(0, I).

U_1 is the identity, U_0 f is the mean of f under N(m, s), and U_ρ keeps that mean while damping
the n-th Hermite component of f by ρⁿ — a low-pass filter on f. Here the K Monte-Carlo copies are
drawn in one tensor and ``f`` is called once on all of them (the copies stacked along the batch
dimension), so smoothing a network costs one batched forward, not a Python loop over K.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["correlated", "smooth"]


def _check(rho: float, samples: int) -> None:
    if not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be in [0, 1] (1 = no smoothing), got {rho}")
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer (the paper uses 5-10), got {samples}")


def correlated(z: torch.Tensor, loc, scale, rho: float, samples: int,
               eps: torch.Tensor | None = None) -> torch.Tensor:
    """K copies ρ z + (1 − ρ) m + s √(1 − ρ²) ε_k of ``z`` ~ N(loc, scale), shape ``(samples, *z.shape)``.

    Each copy is again distributed as N(loc, scale) and has correlation ρ with ``z``. Gradients
    flow to ``z``, ``loc`` and ``scale``. ``eps`` (same shape as the result) fixes the noise.
    """
    _check(rho, samples)
    shape = (int(samples), *z.shape)
    if eps is None:
        eps = torch.randn(shape, dtype=z.dtype, device=z.device)
    elif tuple(eps.shape) != shape:
        raise ValueError(f"eps must have shape {shape} (samples, *z.shape), got {tuple(eps.shape)}")
    rho = float(rho)
    return rho * z + (1.0 - rho) * loc + scale * (math.sqrt(1.0 - rho * rho) * eps)


def _mean_over_samples(out, samples: int, batch: int):
    if isinstance(out, torch.Tensor):
        if out.shape[0] != samples * batch:
            raise ValueError(f"f must keep the batch dimension: got {out.shape[0]} rows for "
                             f"{samples} samples x {batch} inputs")
        return out.reshape(samples, batch, *out.shape[1:]).mean(dim=0)
    if isinstance(out, (tuple, list)):
        return type(out)(_mean_over_samples(o, samples, batch) for o in out)
    raise TypeError(f"f must return a tensor or a tuple of tensors, got {type(out).__name__}")


def smooth(f: Callable, z: torch.Tensor, loc, scale, rho: float, samples: int,
           eps: torch.Tensor | None = None):
    """Monte-Carlo U_ρ f at ``z`` (batch-first), calling ``f`` once on the K copies stacked along
    dim 0 (``samples * batch`` rows); returns f's output (a tensor or tuple of tensors) averaged over
    the copies. ρ = 1 returns ``f(z)`` itself, so it reproduces the unsmoothed model exactly.
    """
    _check(rho, samples)
    if float(rho) == 1.0:
        return f(z)
    copies = correlated(z, loc, scale, rho, samples, eps)
    batch = z.shape[0]
    return _mean_over_samples(f(copies.reshape(int(samples) * batch, *z.shape[1:])), int(samples), batch)
