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

For code that builds a Normal in pieces (NVAE: a head's log sigma, then a log density or a KL),
:func:`log_scale`, :func:`log_prob` and :func:`kl` are each one node too. They keep fewer tensors for
backward than their autograd forms (which keep log sigma, a view holding a whole head output, and
each intermediate): what makes the patched step hold no more than vanilla's (``vaepatch bench
activation-memory``).
"""
from __future__ import annotations

import math

import torch

from vaepatch import gaussian
from vaepatch.precision import half_dtype

__all__ = ["draw_and_kl", "draw_and_kl_autograd", "block_math", "log_scale_math", "log_prob_math", "kl_math",
           "log_scale", "log_prob", "kl"]


def draw_and_kl_autograd(qm, qv, pm, pv, eps, posterior, prior):
    """The reference composition: ``(z, kl)`` through autograd."""
    q_scale, q_log_scale = posterior(qv)
    _, p_log_scale = prior(pv)
    return gaussian.rsample(qm, q_scale, eps), gaussian.kl(qm, q_log_scale, pm, p_log_scale)


def _cap(dtype):
    """The log sigma below which ``gaussian`` caps exp(-log sigma) (``gaussian._inv_scale``)."""
    return math.log(torch.finfo(dtype).max) * (1.0 - 2.0 * torch.finfo(dtype).eps)


def _inv_scale(p_log, lower_bounded: bool):
    """exp(-log sigma_p), capped as ``gaussian.kl`` caps it (no cap needed when log sigma_p has a floor)."""
    if isinstance(p_log, float):
        return math.exp(-p_log)
    if not lower_bounded:
        p_log = torch.clamp(p_log, min=-_cap(p_log.dtype))
    return torch.exp(p_log.neg())


def _times(x, factor):
    """``x * factor`` where the factor may be a tensor or a float (None where it is 0: no gradient)."""
    if isinstance(factor, torch.Tensor):
        return x * factor
    return None if factor == 0 else x if factor == 1 else x * factor


def _forward(qm, qv, pm, pv, eps, posterior, prior):
    """``(z, kl, dkl_dm, dz_dqv, dkl_dqv, -dkl_dpv)``, without autograd, in place where it can."""
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
    return z, kl, dkl_dm, _times(eps, q_dscale), _times(e, q_dlog), _times(total, p_dlog)


def _backward(needs, grads, kept):
    """The four input gradients (qm, qv, pm, pv; eps none) from the output gradients and the kept tensors."""
    (gz, gk), (dkl_dm, dz_dqv, dkl_dqv, minus_dkl_dpv) = grads, kept
    g_pm = (gk * dkl_dm) if gk is not None else None
    g_qm = g_pm if gz is None else gz if g_pm is None else gz + g_pm
    g_pm = g_pm.neg() if g_pm is not None else None  # not in place: g_qm may be this tensor
    parts = [g * c for g, c in ((gz, dz_dqv), (gk, dkl_dqv)) if g is not None and c is not None]
    g_qv = parts[0].add_(parts[1]) if len(parts) == 2 else parts[0] if parts else None
    g_pv = (gk * minus_dkl_dpv).neg_() if gk is not None and minus_dkl_dpv is not None else None
    return g_qm, g_qv, g_pm, g_pv, None


class _Node(torch.autograd.Function):
    """One elementwise node: ``forward(*inputs) -> (outputs, kept)`` runs without autograd and keeps only
    ``kept`` for ``backward(needs_input_grad, output grads, kept) -> input grads``. The two are eager or
    compiled (:func:`_math`'s ``wrap``); either way the node keeps the same tensors."""

    @staticmethod
    def forward(ctx, forward, backward, *inputs):
        outputs, kept = forward(*inputs)
        ctx.save_for_backward(*kept)
        ctx.backward_math = backward
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return (None, None, *ctx.backward_math(ctx.needs_input_grad[2:], grads, ctx.saved_tensors))


def _math(forward, backward, autograd_form, wrap=None):
    """``f(*tensors)``: :class:`_Node` of ``forward`` / ``backward`` (each wrapped by ``wrap``, e.g.
    ``vaepatch.compiled.fused``); 16-bit tensors computed in float32 and cast back; where the arguments
    are not tensors of one shape (broadcasting, numbers), ``autograd_form``, wrapped too."""
    wrap = wrap or (lambda fn: fn)
    forward, backward, fallback = wrap(forward), wrap(backward), wrap(autograd_form)

    def node(*args):
        if not all(isinstance(a, torch.Tensor) and a.shape == args[0].shape for a in args):
            return fallback(*args)
        half = half_dtype(*args)
        if half is None:
            return _Node.apply(forward, backward, *args)
        out = _Node.apply(forward, backward, *(a.float() for a in args))
        return tuple(o.to(half) for o in out) if isinstance(out, tuple) else out.to(half)

    return node


def block_math(posterior, prior, wrap=None):
    """:func:`draw_and_kl` for one (posterior, prior) pair as ``f(qm, qv, pm, pv, eps) -> (z, kl)``.

    ``wrap`` (``vaepatch.compiled.fused``) wraps the node's forward and backward math: compiled, the node
    still keeps only its four tensors for backward (torch.compile of the autograd form, left to its own
    partitioner, kept the inputs, whose storages hold more: VDVAE's prior features). Forms without
    closed-form derivatives use the autograd form, wrapped whole.
    """
    def autograd_form(qm, qv, pm, pv, eps):
        return draw_and_kl_autograd(qm, qv, pm, pv, eps, posterior, prior)

    if not (posterior.has_derivatives and prior.has_derivatives):
        return (wrap or (lambda fn: fn))(autograd_form)

    def forward(qm, qv, pm, pv, eps):
        z, kl, *kept = _forward(qm, qv, pm, pv, eps, posterior, prior)
        return (z, kl), kept

    return _math(forward, _backward, autograd_form, wrap)


def draw_and_kl(qm, qv, pm, pv, eps, posterior, prior):
    """``(z, kl)``: ``z = qm + sigma_q(qv) eps`` and ``KL(N(qm, sigma_q(qv)) || N(pm, sigma_p(pv)))``,
    elementwise, ``posterior`` / ``prior`` being ``vaepatch.scales.Scale`` objects."""
    return block_math(posterior, prior)(qm, qv, pm, pv, eps)


# -- one Normal's pieces, for code that builds them apart (NVAE: a head's log sigma, then a log density or a KL)
def log_scale_math(scale, wrap=None):
    """``f(p) = scale(p)[1]``, log sigma alone, as one node keeping only dlog sigma / dp for backward (the
    autograd form keeps the raw input, whose storage is the whole head output, and its intermediates)."""
    def autograd_form(p):
        return scale(p)[1]

    if not scale.has_derivatives:
        return (wrap or (lambda fn: fn))(autograd_form)
    constant_dlog = scale.derivatives(torch.zeros(1), need_scale=False)[3]  # a number where the form has one
    constant_dlog = None if isinstance(constant_dlog, torch.Tensor) else constant_dlog

    def forward(p):
        _, log, _, dlog = scale.derivatives(p, need_scale=False)
        log = log if isinstance(log, torch.Tensor) else torch.full_like(p, log)
        return log, (dlog if constant_dlog is None else None,)

    def backward(needs, grads, kept):
        return (_times(grads[0], kept[0] if constant_dlog is None else constant_dlog),)

    return _math(forward, backward, autograd_form, wrap)


def _log_prob_forward(x, loc, log_scale):
    inv = _inv_scale(log_scale, lower_bounded=False)
    z = (x - loc).mul_(inv)
    out = torch.mul(z, z).mul_(-0.5).sub_(log_scale).sub_(gaussian.HALF_LOG_2PI)  # gaussian.log_prob's operations
    return out, (z, inv, log_scale < -_cap(log_scale.dtype))  # and where exp(-log sigma) was capped


def _log_prob_backward(needs, grads, kept):
    """In autograd's order (g z first), so a zero upstream gradient stays 0 where z exp(-log sigma) is inf."""
    (g,), (z, inv, capped) = grads, kept
    gz = g * z
    g_loc = gz * inv if needs[0] or needs[1] else None
    g_log = gz.mul_(z).masked_fill_(capped, 0.0).sub_(g) if needs[2] else None  # g (z^2 - 1); capped: -g
    return (g_loc.neg() if needs[0] else None, g_loc if needs[1] else None, g_log)


def log_prob_math(wrap=None):
    """``f(x, loc, log_scale)``: ``vaepatch.gaussian.log_prob`` as one node keeping z, exp(-log sigma) and
    where that was capped (a byte each) for backward; the autograd form keeps four tensors: log sigma
    (whose storage may be a whole head output), exp(-log sigma), x - loc and z."""
    return _math(_log_prob_forward, _log_prob_backward, gaussian.log_prob, wrap)


def _kl_forward(loc1, log_scale1, loc2, log_scale2):
    delta = log_scale1 - log_scale2
    e = torch.expm1(delta * 2.0)
    inv = _inv_scale(log_scale2, lower_bounded=False)
    d = (loc1 - loc2).mul_(inv)
    kl = torch.mul(e, 0.5).sub_(delta).add_(torch.mul(d, d).mul_(0.5))  # gaussian.kl's operations
    return kl, (d, inv, e, log_scale2 < -_cap(log_scale2.dtype))  # and where exp(-log sigma2) was capped


def _kl_backward(needs, grads, kept):
    """In autograd's order (g d first), as the log density's."""
    (g,), (d, inv, e, capped) = grads, kept
    gd = g * d
    g_loc = gd * inv if needs[0] or needs[2] else None
    g_log1 = g * e if needs[1] or needs[3] else None
    g_log2 = gd.mul_(d).masked_fill_(capped, 0.0).add_(g_log1).neg_() if needs[3] else None  # -g (e + d^2)
    return (g_loc if needs[0] else None, g_log1 if needs[1] else None, g_loc.neg() if needs[2] else None, g_log2)


def kl_math(wrap=None):
    """``f(loc1, log_scale1, loc2, log_scale2)``: ``vaepatch.gaussian.kl`` as one node keeping d = (loc1 -
    loc2) exp(-log sigma2), exp(-log sigma2), expm1(2 (log sigma1 - log sigma2)) and where exp(-log sigma2)
    was capped (a byte each); the autograd form keeps five, log sigma2 (maybe a whole head output's) among them."""
    return _math(_kl_forward, _kl_backward, gaussian.kl, wrap)


log_prob = log_prob_math()
kl = kl_math()


def log_scale(p, scale):
    """``log_scale_math(scale)(p)``, eagerly."""
    return log_scale_math(scale)(p)
