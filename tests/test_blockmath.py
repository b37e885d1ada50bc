"""`vaepatch.blockmath`: one latent group's scales, draw and KL as one autograd node, checked against
an independent float64 reference (numpy: the scales' closed forms from test_scales, the KL's from
test_gaussian) at extreme raw outputs, in float32 and 16-bit, values and gradients."""
import warnings

import numpy as np
import pytest
import torch

from vaepatch import blockmath, gaussian, scales
from tests.test_gaussian import ref_kl
from tests.test_scales import CASES

# every form with closed-form derivatives, as the posterior and as the prior
SPECS = [s for s in CASES if scales.get(s).has_derivatives]
RAW = np.array([-1e4, -200.0, -80.0, -20.0, -1.0, -1e-7, 0.0, 1e-7, 0.5, 1.0, 20.0, 80.0, 1e4])


def _reference(qm, qv, pm, pv, eps, post, prior):
    """float64: z, KL and their gradients w.r.t. (qm, qv, pm, pv) for a loss z.sum() + (w * KL).sum()."""
    q_scale, q_log, q_ds, q_dlog = CASES[post][0](qv)
    _, p_log, _, p_dlog = CASES[prior][0](pv)
    z = qm + q_scale * eps
    kl, (d_m1, d_l1, d_m2, d_l2) = ref_kl(qm, q_log, pm, p_log)
    return z, kl, (d_m1, d_l1, d_m2, d_l2), (q_ds, q_dlog, p_dlog), np.abs(q_log) + np.abs(p_log)


def _grid():
    qv, pv = np.meshgrid(RAW, RAW, indexing="ij")
    rng = np.random.default_rng(0)
    qm, pm, eps = (rng.standard_normal(qv.shape) for _ in range(3))
    qm[0, 0] = pm[0, 0]  # equal means: the (m1 - m2)^2 / sigma2^2 term is exactly 0 even when 1/sigma2^2 is inf
    return qm, qv, pm, pv, eps


@pytest.mark.parametrize("prior", SPECS)
@pytest.mark.parametrize("post", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_node_matches_the_float64_reference(post, prior, dtype):
    weight = np.linspace(0.5, 1.5, RAW.size ** 2).reshape(RAW.size, RAW.size)  # the KL's upstream gradient
    leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in _grid()[:4]]
    eps = torch.tensor(_grid()[4], dtype=dtype)
    z, kl = blockmath.draw_and_kl(*leaves, eps, scales.get(post), scales.get(prior))
    assert z.dtype == kl.dtype == dtype
    finfo = torch.finfo(dtype)
    # the reference starts from the inputs as the dtype holds them (16-bit rounds them)
    qm, qv, pm, pv, e = (t.detach().double().numpy() for t in (*leaves, eps))
    z_ref, kl_ref, (d_m1, d_l1, d_m2, d_l2), (q_ds, q_dlog, p_dlog), logs = _reference(qm, qv, pm, pv, e, post, prior)
    with np.errstate(invalid="ignore", over="ignore"):
        grads_ref = [1.0 + weight * d_m1, e * q_ds + weight * d_l1 * q_dlog, weight * d_m2, weight * d_l2 * p_dlog]
    ok = np.isfinite(kl_ref) & (np.abs(kl_ref) < finfo.max / 4)
    assert ok.sum() >= 50  # a third or more of the 169 extreme pairs have a KL the dtype can hold
    kl_t = kl.detach().double().numpy()
    assert np.isfinite(kl_t[ok]).all()
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    # log sigma_q - log sigma_p of two large logs is only as exact as the dtype holds them (float32 at
    # |log sigma| = 1e4: 1e-3), whatever the code does: allow that rounding, through dKL/dD
    with np.errstate(invalid="ignore", over="ignore"):
        slack = 4 * torch.finfo(torch.float32).eps * logs * (np.abs(d_l1) + 1.0)
    assert np.all(np.abs(kl_t[ok] - kl_ref[ok]) <= rtol * (1 + np.abs(kl_ref[ok])) + slack[ok])
    z_ok = np.abs(z_ref) < finfo.max / 4  # a draw beyond the dtype's range (exp(80) in float16) is inf there too
    np.testing.assert_allclose(z.detach().double().numpy()[z_ok], z_ref[z_ok], rtol=rtol, atol=rtol)
    (z.sum() + (kl * torch.tensor(weight, dtype=dtype))[torch.isfinite(kl)].sum()).backward()
    for leaf, ref in zip(leaves, grads_ref):
        g = leaf.grad.double().numpy() if leaf.grad is not None else np.zeros(qv.shape)
        fine = ok & np.isfinite(ref) & (np.abs(ref) < finfo.max / 4)
        assert np.isfinite(g[fine]).all()
        np.testing.assert_allclose(g[fine], ref[fine], rtol=rtol, atol=rtol * (1 + np.abs(ref[fine]).max() * 1e-6))


@pytest.mark.parametrize("post,prior", [("upbounded(1)", "constant(1)"), ("bounded(1e-5, 1)", "bounded(0.01, 1)"),
                                        ("explin", "exp"), ("exp", "exp")])
def test_one_node_gives_the_autograd_forms_numbers(post, prior):
    """Same values and gradients as the autograd composition (the form torch.compile fuses), on a
    realistic batch: the two paths a run can take agree."""
    g = torch.Generator().manual_seed(1)
    shape = (4, 8, 16, 16)
    inputs = [torch.randn(shape, generator=g) * s for s in (1.0, 3.0, 1.0, 3.0)]
    eps = torch.randn(shape, generator=g)
    results = []
    for fn in (blockmath.draw_and_kl, blockmath.draw_and_kl_autograd):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        z, kl = fn(*leaves, eps, scales.get(post), scales.get(prior))
        (z * 0.3 + kl).sum().backward()
        results.append((z.detach(), kl.detach(), [leaf.grad if leaf.grad is not None else torch.zeros(shape)
                                                  for leaf in leaves]))
    (z1, kl1, g1), (z2, kl2, g2) = results
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(kl1, kl2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forms_without_closed_form_derivatives_fall_back_to_autograd():
    post, prior = scales.get("softclamp"), scales.get("upbounded1")
    assert not post.has_derivatives
    leaves = [torch.randn(3, requires_grad=True) for _ in range(4)]
    z, kl = blockmath.draw_and_kl(*leaves, torch.randn(3), post, prior)
    assert z.grad_fn is not None and type(z.grad_fn).__name__ != "_DrawAndKLBackward"
    kl.sum().backward()
    assert all(leaf.grad is not None for leaf in leaves[1:])


def test_only_the_kl_used_gives_the_same_gradients():
    """A caller that drops z (or the KL) still gets the right gradients for what it used."""
    leaves = [torch.randn(5, requires_grad=True) for _ in range(4)]
    eps = torch.randn(5)
    post, prior = scales.get("upbounded1"), scales.get("explin")
    for pick in (0, 1):
        grads = []
        for fn in (blockmath.draw_and_kl, blockmath.draw_and_kl_autograd):
            for leaf in leaves:
                leaf.grad = None
            fn(*leaves, eps, post, prior)[pick].sum().backward()
            grads.append([leaf.grad if leaf.grad is not None else torch.zeros(5) for leaf in leaves])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


# -- the pieces NVAE's eager patch uses: a head's log sigma, and the log density, each one node ------------
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_log_scale_node_matches_the_float64_reference(spec, dtype):
    p = torch.tensor(RAW, dtype=dtype, requires_grad=True)
    log = blockmath.log_scale(p, scales.get(spec))
    assert log.dtype == dtype
    _, log_ref, _, dlog_ref = CASES[spec][0](p.detach().double().numpy())
    weight = np.linspace(0.5, 1.5, RAW.size)
    ok = np.abs(log_ref) < torch.finfo(dtype).max / 4
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    np.testing.assert_allclose(log.detach().double().numpy()[ok], log_ref[ok], rtol=rtol, atol=rtol)
    (log * torch.tensor(weight, dtype=dtype)).sum().backward()
    grad = p.grad.double().numpy() if p.grad is not None else np.zeros(RAW.size)
    np.testing.assert_allclose(grad, weight * dlog_ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_log_prob_node_gives_the_autograd_forms_numbers(dtype):
    """Values and gradients as ``gaussian.log_prob``'s autograd form, at extreme log sigmas too (below
    -88.7 in float32 exp(-log sigma) is capped: no gradient through it), and against float64."""
    log_scales = torch.tensor([-1e4, -200.0, -89.0, -80.0, -20.0, -1.0, 0.0, 1.0, 20.0, 80.0, 1e4])
    log_scales = log_scales.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max)
    ls, diff = torch.meshgrid(log_scales, torch.tensor([0.0, 1e-30, 0.5, -3.0, 1e4]), indexing="ij")
    loc = torch.randn(ls.shape, generator=torch.Generator().manual_seed(0))
    inputs = [(loc + diff).to(dtype), loc.to(dtype), ls.to(dtype)]
    results = []
    for fn in (blockmath.log_prob, gaussian.log_prob):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        finite = torch.isfinite(out)
        (out[finite] * 0.7).sum().backward()
        results.append((out.detach(), [leaf.grad for leaf in leaves], finite))
    (out1, g1, f1), (out2, g2, f2) = results
    assert out1.dtype == dtype and torch.equal(f1, f2)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0, equal_nan=True)  # the same operations forward
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6, equal_nan=True)
    x, m, s = (t.double().numpy() for t in inputs)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = -0.5 * ((x - m) * np.exp(-s)) ** 2 - s - 0.5 * np.log(2 * np.pi)
    ok = np.abs(ref) < torch.finfo(dtype).max / 4
    assert ok.sum() >= 25
    np.testing.assert_allclose(out1.double().numpy()[ok], ref[ok], rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_block_math_compiled_keeps_the_nodes_numbers_and_tensors():
    """``block_math(..., wrap=fused)``: the node's forward and backward compiled, the same numbers as eager
    and the same four tensors kept for backward (the compiled autograd form kept the inputs' storages)."""
    from vaepatch.compiled import fused

    post, prior = scales.get("upbounded1"), scales.get("explin")
    g = torch.Generator().manual_seed(3)
    head = [torch.randn(4, c, 8, 8, generator=g) * 3 for c in (16, 48)]  # (qm, qv), (pm, pv, VDVAE's features)
    eps = torch.randn(4, 8, 8, 8, generator=g)
    results = []
    for wrap in (None, fused):
        math_fn = blockmath.block_math(post, prior, wrap=wrap)
        leaves = [t.clone().requires_grad_(True) for t in head]
        args = (*leaves[0].chunk(2, dim=1), leaves[1][:, :8], leaves[1][:, 8:16], eps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            math_fn(*args)[1].sum().backward()  # a first call compiles the forward, its backward the backward
        assert not [w for w in caught if "vaepatch" in str(w.message)]  # no fallback to eager
        for leaf in leaves:
            leaf.grad = None
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            z, kl = math_fn(*args)
        (z * 0.3 + kl).sum().backward()
        results.append((z.detach(), kl.detach(), [leaf.grad for leaf in leaves],
                        [t.untyped_storage().nbytes() for t in kept]))
    (z1, kl1, g1, kept1), (z2, kl2, g2, kept2) = results
    assert kept1 == kept2 == [4 * 8 * 8 * 8 * 4] * 4  # four latent-sized tensors of their own, no input's storage
    torch.testing.assert_close(z2, z1)
    torch.testing.assert_close(kl2, kl1, rtol=1e-5, atol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kl_node_gives_the_autograd_forms_numbers(dtype):
    """``blockmath.kl`` (NVAE's eager KL): values as ``gaussian.kl``, gradients as its autograd form and as
    the float64 reference, at extreme log sigmas too (exp(-log sigma2) capped below -88.7 in float32)."""
    logs = torch.tensor([-1e4, -200.0, -89.0, -80.0, -20.0, -1.0, 0.0, 1.0, 20.0, 80.0, 1e4])
    logs = logs.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max)
    l1, l2, diff = torch.meshgrid(logs, logs, torch.tensor([0.0, 1e-30, 0.5, -3.0]), indexing="ij")
    m2 = torch.randn(l1.shape, generator=torch.Generator().manual_seed(0))
    inputs = [(m2 + diff).to(dtype), l1.to(dtype), m2.to(dtype), l2.to(dtype)]
    results = []
    for fn in (blockmath.kl, gaussian.kl):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        finite = torch.isfinite(out)
        (out[finite] * 0.7).sum().backward()
        results.append((out.detach(), [leaf.grad for leaf in leaves], finite))
    (out1, g1, f1), (out2, g2, f2) = results
    assert out1.dtype == dtype and torch.equal(f1, f2)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0, equal_nan=True)  # the same operations forward
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-5, equal_nan=True)
    ref, ref_grads = ref_kl(*(t.double().numpy() for t in inputs))
    ok = f1.numpy() & (np.abs(ref) < torch.finfo(dtype).max / 4)
    assert ok.sum() >= 150
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(out1.double().numpy()[ok], ref[ok], rtol=rtol, atol=rtol)
    for grad, r in zip(g1, ref_grads):
        fine = ok & np.isfinite(r) & (np.abs(r) < torch.finfo(dtype).max / 4)
        np.testing.assert_allclose(grad.double().numpy()[fine], 0.7 * r[fine], rtol=rtol, atol=rtol)
