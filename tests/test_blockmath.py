"""`vaepatch.blockmath`: one latent group's scales, draw and KL as one autograd node, checked against
an independent float64 reference (numpy: the scales' closed forms from test_scales, the KL's from
test_gaussian) at extreme raw outputs, in float32 and 16-bit, values and gradients."""
import numpy as np
import pytest
import torch

from vaepatch import blockmath, scales
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
