"""One latent group's elementwise math -- both scales, the draw and the stable KL -- as one autograd node.

Written with autograd, ``z = m_q + sigma_q(v_q) eps`` and ``KL(N(m_q, sigma_q) || N(m_p, sigma_p(v_p)))``
take ~25 elementwise passes forward and as many backward, each a fresh tensor: on a small model
that is a tenth of a training step (VDVAE's tiny config on CPU). Here the forward runs without
autograd, mostly in place, and keeps four tensors -- the derivatives of z and of the KL with respect
to each input, from the parameterizations' closed-form derivatives (``vaepatch.scales.derivatives``)
-- so the backward is four products. With l = log sigma, D = l_q - l_p, d = (m_q - m_p) exp(-l_p):

    KL          = expm1(2 D) / 2 - D + d^2 / 2            (``vaepatch.gaussian.kl``)
    dKL/dm_q    = d exp(-l_p)           = -dKL/dm_p
    dKL/dv_q    = expm1(2 D) l_q'(v_q)
    dKL/dv_p    = -(expm1(2 D) + d^2) l_p'(v_p)
    dz/dv_q     = eps sigma_q'(v_q)

The same numbers as the autograd form (tests: values and gradients at extreme inputs, float32 and
16-bit); 16-bit inputs are computed in float32 (``vaepatch.precision``). Parameterizations without
closed-form derivatives fall back to the autograd form.
"""
from __future__ import annotations

import math

import torch

from vaepatch import gaussian
from vaepatch.precision import half_dtype

__all__ = ["draw_and_kl", "draw_and_kl_autograd"]


def draw_and_kl_autograd(qm, qv, pm, pv, eps, posterior, prior):
    """The reference composition: ``(z, kl)`` through autograd."""
    q_scale, q_log_scale = posterior(qv)
    _, p_log_scale = prior(pv)
    return gaussian.rsample(qm, q_scale, eps), gaussian.kl(qm, q_log_scale, pm, p_log_scale)


def _inv_scale(p_log, lower_bounded: bool):
    """exp(-log sigma_p), capped as ``gaussian.kl`` caps it (no cap needed when log sigma_p has a floor)."""
    if isinstance(p_log, float):
        return math.exp(-p_log)
    if not lower_bounded:
        limit = math.log(torch.finfo(p_log.dtype).max) * (1.0 - 2.0 * torch.finfo(p_log.dtype).eps)
        p_log = torch.clamp(p_log, min=-limit)
    return torch.exp(p_log.neg())


def _times(x, factor):
    """``x * factor`` where the factor may be a tensor or a float (None where it is 0: no gradient)."""
    if isinstance(factor, torch.Tensor):
        return x * factor
    return None if factor == 0 else x if factor == 1 else x * factor


class _DrawAndKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qm, qv, pm, pv, eps, posterior, prior):
        q_scale, q_log, q_dscale, q_dlog = posterior.derivatives(qv)
        _, p_log, _, p_dlog = prior.derivatives(pv, need_scale=False)
        z = torch.addcmul(qm, q_scale, eps) if isinstance(q_scale, torch.Tensor) else qm + q_scale * eps
        delta = q_log - p_log
        if not isinstance(delta, torch.Tensor):  # both sides constant
            delta = torch.full_like(qm, delta)
        e = torch.expm1(delta * 2.0)
        inv = _inv_scale(p_log, prior.lower_bounded)
        d = (qm - pm).mul_(inv)
        total = torch.addcmul(e, d, d)  # expm1(2 D) + d^2
        kl = torch.sub(total.mul(0.5), delta)
        dkl_dm = d.mul_(inv)  # d is not needed any more
        dz_dqv = _times(eps, q_dscale)
        dkl_dqv = _times(e, q_dlog)
        dkl_dpv = _times(total, p_dlog)
        ctx.save_for_backward(dkl_dm, dz_dqv, dkl_dqv, dkl_dpv)
        return z, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, gk):
        dkl_dm, dz_dqv, dkl_dqv, minus_dkl_dpv = ctx.saved_tensors
        g_pm = (gk * dkl_dm) if gk is not None else None
        g_qm = g_pm if gz is None else gz if g_pm is None else gz + g_pm
        g_pm = g_pm.neg() if g_pm is not None else None  # not in place: g_qm may be this tensor
        parts = [g * c for g, c in ((gz, dz_dqv), (gk, dkl_dqv)) if g is not None and c is not None]
        g_qv = parts[0].add_(parts[1]) if len(parts) == 2 else parts[0] if parts else None
        g_pv = (gk * minus_dkl_dpv).neg_() if gk is not None and minus_dkl_dpv is not None else None
        return g_qm, g_qv, g_pm, g_pv, None, None, None


def draw_and_kl(qm, qv, pm, pv, eps, posterior, prior):
    """``(z, kl)``: ``z = qm + sigma_q(qv) eps`` and ``KL(N(qm, sigma_q(qv)) || N(pm, sigma_p(pv)))``,
    elementwise, ``posterior`` / ``prior`` being ``vaepatch.scales.Scale`` objects."""
    if not (posterior.has_derivatives and prior.has_derivatives):
        return draw_and_kl_autograd(qm, qv, pm, pv, eps, posterior, prior)
    half = half_dtype(qm, qv, pm, pv, eps)
    if half is None:
        return _DrawAndKL.apply(qm, qv, pm, pv, eps, posterior, prior)
    z, kl = _DrawAndKL.apply(*(t.float() for t in (qm, qv, pm, pv, eps)), posterior, prior)
    return z.to(half), kl.to(half)
