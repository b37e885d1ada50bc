"""Stable Normal math: KL, log_prob, rsample, entropy and the StableNormal distribution."""
import itertools
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaepatch import gaussian
from vaepatch.gaussian import StableNormal

HALF = [torch.float16, torch.bfloat16]


def ref_kl(m1, l1, m2, l2):
    """Independent float64 KL(N(m1, e^l1) || N(m2, e^l2)) and its gradient (d/dm1, d/dl1, d/dm2, d/dl2)."""
    m1, l1, m2, l2 = (np.asarray(a, dtype=np.float64) for a in (m1, l1, m2, l2))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        dm = m1 - m2
        r = np.exp(2.0 * (l1 - l2))                            # sigma1^2 / sigma2^2
        w = np.where(dm == 0, 0.0, dm * dm * np.exp(-2.0 * l2))  # (m1 - m2)^2 / sigma2^2, 0 * inf := 0
        g = np.where(dm == 0, 0.0, dm * np.exp(-2.0 * l2))       # (m1 - m2) / sigma2^2
        value = (l2 - l1) + 0.5 * r + 0.5 * w - 0.5
        grads = (g, r - 1.0, -g, 1.0 - r - w)
    return value, grads


def _kl_with_grads(m1, l1, m2, l2, dtype):
    def make(a):
        t = a.detach().double() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a, dtype=np.float64))
        return t.to(dtype).requires_grad_(True)

    args = [make(a) for a in (m1, l1, m2, l2)]
    value = gaussian.kl(*args)
    grads = torch.autograd.grad(value.sum(), args)
    return value.detach(), grads, [a.detach() for a in args]


def _representable(x, dtype, margin=4.0):
    return np.isfinite(x) & (np.abs(x) < torch.finfo(dtype).max / margin)


# ----------------------------------------------------------------------------------------
# KL: values
# ----------------------------------------------------------------------------------------


def test_kl_matches_torch_and_formula_float64():
    g = torch.Generator().manual_seed(0)
    n = 10000
    m1, m2 = 3 * torch.randn(n, generator=g, dtype=torch.float64), 3 * torch.randn(n, generator=g, dtype=torch.float64)
    l1, l2 = (6 * torch.rand(n, generator=g, dtype=torch.float64) - 3 for _ in range(2))
    ours = gaussian.kl(m1, l1, m2, l2)
    assert ours.dtype == torch.float64
    theirs = kl_divergence(Normal(m1, l1.exp()), Normal(m2, l2.exp()))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    value, _ = ref_kl(m1.numpy(), l1.numpy(), m2.numpy(), l2.numpy())
    np.testing.assert_allclose(ours.numpy(), value, rtol=1e-10, atol=1e-12)
    # the reference is not vacuous: swapping the arguments changes the KL
    assert not np.allclose(gaussian.kl(m2, l2, m1, l1).numpy(), value, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_non_negative(dtype):
    g = torch.Generator().manual_seed(1)
    n = 20000
    m1 = torch.randn(n, generator=g).to(dtype)
    l1 = (20 * torch.rand(n, generator=g) - 10).to(dtype)
    # half far apart, half nearly identical (where cancellation could make it negative)
    near = torch.arange(n) % 2 == 0
    m2 = torch.where(near, m1 + 1e-6 * torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype))
    l2 = torch.where(near, l1 + 1e-5 * torch.randn(n, generator=g).to(dtype), (20 * torch.rand(n, generator=g) - 10).to(dtype))
    value = gaussian.kl(m1, l1, m2, l2)
    finite = torch.isfinite(value)
    assert finite.float().mean() > 0.99
    assert (value[finite] >= 0).all(), f"negative KL {value[finite].min().item()}"
    assert (value[~near] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_kl_zero_for_identical(dtype):
    fi = torch.finfo(dtype)
    ls = torch.tensor([-200.0, -80.0, -20.0, -1.0, 0.0, 1.0, 5.0, 20.0, 80.0, 1e4, -1e4]).to(dtype)
    ls = ls[torch.isfinite(ls)]
    for loc in (0.0, 3.0, -1e3):
        m = torch.full_like(ls, loc)
        value, grads, _ = _kl_with_grads(m, ls, m, ls, dtype)
        assert torch.equal(value, torch.zeros_like(value)), value  # exactly 0, no nan from 0 * inf
        for gr in grads:
            assert torch.isfinite(gr).all() and (gr == 0).all(), gr
    # the specific case: identical means, log_scale2 = -200 (sigma2 underflows to 0)
    z = torch.zeros((), dtype=dtype)
    low = torch.tensor(max(-200.0, fi.min), dtype=dtype)
    assert gaussian.kl(z, low, z, low).item() == 0.0


def test_kl_identical_means_tiny_prior_scale_float32():
    """Identical means, sigma2 = e^-200: the mean term is 0 * inf in a naive formula."""
    z1 = torch.zeros(4, requires_grad=True)
    z2 = torch.zeros(4, requires_grad=True)
    l1 = torch.tensor([-200.0, -230.0, -210.0, -170.0], requires_grad=True)
    l2 = torch.full((4,), -200.0, requires_grad=True)
    value = gaussian.kl(z1, l1, z2, l2)
    ref, rgrads = ref_kl(0.0, l1.detach().double().numpy(), 0.0, -200.0)
    assert value[0].item() == 0.0
    np.testing.assert_allclose(value[:3].detach().double().numpy(), ref[:3], rtol=1e-6)  # 29.5, 9.5
    # l1 - l2 = 30: e^60 / 2 = 5.7e25, still a float32
    assert value[3].item() == pytest.approx(ref[3], rel=1e-5)
    grads = torch.autograd.grad(value.sum(), [z1, l1, z2, l2])
    for gr, rg in zip(grads, rgrads):
        assert torch.isfinite(gr).all()
        np.testing.assert_allclose(gr.double().numpy(), rg, rtol=1e-5, atol=1e-6)


def _extreme_cases():
    ls = [-1e4, -80.0, -20.0, 0.0, 20.0, 80.0, 1e4]
    dms = [0.0, 1.0]
    return [(dm, l1, l2) for dm in dms for l1 in ls for l2 in ls]


def test_kl_finite_with_finite_grads_at_extreme_log_scales_float32():
    cases = _extreme_cases()
    dm, l1, l2 = (np.array(c) for c in zip(*cases))
    ref, rgrads = ref_kl(dm, l1, 0.0 * dm, l2)
    value, grads, _ = _kl_with_grads(dm, l1, 0.0 * dm, l2, torch.float32)
    need = _representable(ref, torch.float32)
    need_g = need & np.all([_representable(rg, torch.float32) for rg in rgrads], axis=0)
    assert need.sum() >= 40 and need_g.sum() >= 30
    v = value.double().numpy()
    assert np.isfinite(v[need]).all(), [cases[i] for i in np.flatnonzero(need & ~np.isfinite(v))]
    np.testing.assert_allclose(v[need], ref[need], rtol=1e-5, atol=1e-5)
    for k, (gr, rg) in enumerate(zip(grads, rgrads)):
        gr = gr.double().numpy()
        assert np.isfinite(gr[need_g]).all(), (k, [cases[i] for i in np.flatnonzero(need_g & ~np.isfinite(gr))])
        np.testing.assert_allclose(gr[need_g], rg[need_g], rtol=1e-5, atol=1e-5)
    # the named case: log_scale1 = -1e4 against a unit prior: KL = 1e4 - 1/2
    i = cases.index((0.0, -1e4, 0.0))
    assert v[i] == pytest.approx(1e4 - 0.5, rel=1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_kl_finite_over_16bit_ranges(dtype):
    fi = torch.finfo(dtype)
    top = math.log10(fi.max)
    mags = np.concatenate([[0.0], np.logspace(-3, top, 25), [fi.max]])
    ls = np.unique(torch.tensor(np.concatenate([-mags, mags, [-11.1, -11.0, -10.0, 5.0, 5.5]])).to(dtype).double().numpy())
    dms = np.array([0.0, 1e-3, 1.0, 100.0])
    grid = np.array(list(itertools.product(dms, ls, ls)))
    dm, l1, l2 = grid.T
    ref, rgrads = ref_kl(dm, l1, 0.0 * dm, l2)
    value, grads, _ = _kl_with_grads(dm, l1, 0.0 * dm, l2, dtype)
    need = _representable(ref, dtype)
    need_g = need & np.all([_representable(rg, dtype) for rg in rgrads], axis=0)
    assert need.sum() > 0.2 * len(grid) and need_g.sum() > 0.2 * len(grid)
    v = value.double().numpy()
    bad = need & ~np.isfinite(v)
    assert not bad.any(), f"{bad.sum()} non-finite KL, e.g. (dm, l1, l2) = {grid[bad][:5].tolist()}"
    # accuracy: the error a few 16-bit roundings imply.  delta = l1 - l2 is rounded (abs error
    # eps |delta|), so e^(2 delta) / 2 carries a relative eps (1 + 2 |delta|); likewise the mean
    # term through e^(-l2); the linear term an absolute eps |delta|.
    with np.errstate(all="ignore"):
        delta = l1 - l2
        t_var = 0.5 * np.exp(2 * delta)
        t_mean = np.where(dm == 0, 0.0, 0.5 * dm ** 2 * np.exp(-2 * l2))
        bound = 2 * fi.eps * (t_var * (1 + 2 * np.abs(delta)) + t_mean * (1 + 2 * np.abs(l2)) + np.abs(delta) + 1)
        err = np.abs(v - ref)
        worst = np.argmax(np.where(need, err / bound, 0))
    assert (err[need] <= bound[need]).all(), (grid[worst], v[worst], ref[worst], bound[worst])
    for k, gr in enumerate(grads):
        gr = gr.double().numpy()
        bad = need_g & ~np.isfinite(gr)
        assert not bad.any(), f"grad {k} non-finite at (dm, l1, l2) = {grid[bad][:5].tolist()}"


def test_kl_accuracy_near_equal_scales():
    """KL(N(0, 1 + 1e-4) || N(0, 1)) ~ 1e-8: the textbook formula cancels it away in float32."""
    sigma1 = torch.tensor(1.0 + 1e-4, dtype=torch.float32)
    l1 = torch.log1p(torch.tensor(1e-4, dtype=torch.float32))
    zero = torch.zeros((), dtype=torch.float32)
    # float64 truth for exactly these float32 inputs
    x = float(l1)
    truth = -x + 0.5 * math.expm1(2 * x)
    assert 0.9e-8 < truth < 1.1e-8
    ours = gaussian.kl(zero, l1, zero, zero).item()
    assert ours == pytest.approx(truth, rel=1e-2)
    # the textbook formula in float32: 0.5 sigma1^2 - 0.5 rounds sigma1^2 = 1.0002 first (torch's
    # own keeps var_ratio - 1 - log(var_ratio) together and happens to survive this case)
    one = torch.ones((), dtype=torch.float32)
    textbook = (torch.log(one) - torch.log(sigma1) + sigma1 ** 2 / (2 * one ** 2) - 0.5).item()
    truth_tb = -math.log(float(sigma1)) + 0.5 * float(sigma1) ** 2 - 0.5
    assert abs(textbook - truth_tb) / truth_tb > 0.01


# ----------------------------------------------------------------------------------------
# log_prob, entropy, rsample
# ----------------------------------------------------------------------------------------


def test_log_prob_matches_torch_float64():
    g = torch.Generator().manual_seed(2)
    n = 5000
    x, loc = 3 * torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    ls = 8 * torch.rand(n, generator=g, dtype=torch.float64) - 4
    ours = gaussian.log_prob(x, loc, ls)
    torch.testing.assert_close(ours, Normal(loc, ls.exp()).log_prob(x), rtol=1e-12, atol=1e-12)
    ref = -0.5 * ((x - loc).numpy() * np.exp(-ls.numpy())) ** 2 - ls.numpy() - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian.entropy(ls), Normal(loc, ls.exp()).entropy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_log_prob_finite_at_extreme_log_scale(dtype):
    fi = torch.finfo(dtype)
    ls = torch.tensor([-1e4, -200.0, -80.0, -20.0, 0.0, 20.0, 80.0, 200.0, 1e4]).clamp(fi.min, fi.max).to(dtype)
    ls = ls.requires_grad_(True)
    loc = torch.zeros_like(ls, requires_grad=True)
    x = torch.zeros_like(ls, requires_grad=True)  # x == loc: the density at its mode, -log sigma - log sqrt(2 pi)
    lp = gaussian.log_prob(x, loc, ls)
    ref = -ls.detach().double() - 0.5 * math.log(2 * math.pi)
    ok = ref.abs() < fi.max / 4
    assert torch.isfinite(lp[ok]).all(), lp
    torch.testing.assert_close(lp.double()[ok], ref[ok], rtol=2 * fi.eps, atol=2 * fi.eps * 10)
    grads = torch.autograd.grad(lp[ok].sum(), [x, loc, ls])
    for gr in grads:
        assert torch.isfinite(gr).all()
    # off the mode by one unit: -(1/2) e^(-2 l) is finite only for large l; where it is, it must be
    lp1 = gaussian.log_prob(torch.ones_like(ls), loc, ls).detach()
    with np.errstate(over="ignore"):
        ref1 = -0.5 * np.exp(-2 * ls.detach().double().numpy()) - ls.detach().double().numpy() - 0.5 * math.log(2 * math.pi)
    ok1 = torch.from_numpy(_representable(ref1, dtype))
    assert ok1.sum() >= 4 and torch.isfinite(lp1[ok1]).all()
    assert (lp1[~ok1] == -math.inf).all()  # not representable: -inf, never nan
    assert not torch.isnan(lp1).any()


def test_rsample_statistics():
    torch.manual_seed(1234)
    n = 200_000
    loc, scale = torch.full((n,), 2.0), torch.full((n,), 3.0)
    x = gaussian.rsample(loc, scale)
    # 6-sigma bounds on the sample mean and the sample std (var of s ~ sigma^2 / (2n))
    mean_bound = 6 * 3.0 / math.sqrt(n)
    std_bound = 6 * 3.0 / math.sqrt(2 * n)
    assert abs(x.mean().item() - 2.0) < mean_bound
    assert abs(x.std().item() - 3.0) < std_bound
    # and it is reparameterized: d x / d loc = 1, d x / d scale = eps
    eps = torch.randn(5)
    l = torch.zeros(5, requires_grad=True)
    s = torch.ones(5, requires_grad=True)
    y = gaussian.rsample(l, s, eps)
    assert torch.equal(y.detach(), eps)
    gl, gs = torch.autograd.grad(y.sum(), [l, s])
    assert torch.equal(gl, torch.ones(5)) and torch.equal(gs, eps)
    # a scale that underflowed to 0 returns the mean, with a finite gradient
    z = gaussian.rsample(torch.ones(3), torch.zeros(3, requires_grad=True))
    assert torch.equal(z.detach(), torch.ones(3))


# ----------------------------------------------------------------------------------------
# StableNormal
# ----------------------------------------------------------------------------------------


def test_stable_normal_from_raw_and_stable_kl():
    loc = torch.zeros(3)
    raw = torch.tensor([-60.0, 0.0, 3.0])
    q = StableNormal.from_raw(loc, raw, "upbounded1")
    assert isinstance(q, Normal)
    # upbounded(1): log sigma = p + log(1/2) for p <= 0, log(2 - e^-p) + log(1/2) above
    expect = torch.tensor([-60.0 + math.log(0.5), math.log(0.5), math.log(2 - math.exp(-3.0)) + math.log(0.5)])
    torch.testing.assert_close(q.log_scale, expect)
    p = StableNormal.from_raw(torch.zeros(3), torch.zeros(3), "cst1")
    assert torch.equal(p.scale, torch.ones(3))
    value = kl_divergence(q, p)
    torch.testing.assert_close(value, gaussian.kl(q.loc, q.log_scale, p.loc, p.log_scale))
    # log sigma ~ -60.7 in float32: sigma^2 underflows, torch's own Normal KL is inf there
    assert torch.isfinite(value).all()
    ref, _ = ref_kl(0.0, expect.double().numpy(), 0.0, 0.0)
    np.testing.assert_allclose(value.double().numpy(), ref, rtol=1e-5)
    torch_kl = kl_divergence(Normal(q.loc, q.scale), Normal(p.loc, p.scale))
    assert not torch.isfinite(torch_kl[0])


def test_mixed_pairs_dispatch_to_stable_kl():
    # StableNormal || Normal: sigma_q = e^-60.7 would make torch's KL inf
    q = StableNormal.from_raw(torch.zeros(1), torch.tensor([-60.0]), "upbounded1")
    n = Normal(torch.zeros(1), torch.ones(1))
    v = kl_divergence(q, n)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, gaussian.kl(q.loc, q.log_scale, n.loc, torch.zeros(1)))
    assert not torch.isfinite(kl_divergence(Normal(q.loc, q.scale), n)).all()
    # Normal || StableNormal whose scale underflowed to 0 (log sigma = -110 exactly)
    s = StableNormal.from_raw(torch.zeros(1), torch.tensor([-110.0]), "exp")
    assert s.scale.item() == 0.0 and s.log_scale.item() == -110.0
    p = Normal(torch.zeros(1), torch.tensor([1e-40]))  # subnormal but nonzero
    v2 = kl_divergence(p, s)
    assert torch.isfinite(v2).all() and (v2 > 0).all()
    ref, _ = ref_kl(0.0, math.log(float(p.scale)), 0.0, -110.0)
    assert v2.item() == pytest.approx(float(ref), rel=1e-4)
    assert not torch.isfinite(kl_divergence(p, Normal(s.loc, s.scale, validate_args=False))).all()


def test_stable_normal_log_prob_entropy_match_torch_float64():
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(100, generator=g, dtype=torch.float64)
    raw = 4 * torch.randn(100, generator=g, dtype=torch.float64)
    for spec in ("exp", "explin", "upbounded1", "softplus(1)", "bounded"):
        s = StableNormal.from_raw(loc, raw, spec)
        t = Normal(loc, s.scale)
        x = torch.randn(100, generator=g, dtype=torch.float64)
        # softplus's log sigma is float32-tuned (its tail series is off by up to 2.4e-8 in float64)
        rt = 1e-7 if spec.startswith("softplus") else 1e-10
        torch.testing.assert_close(s.log_prob(x), t.log_prob(x), rtol=rt, atol=rt)
        torch.testing.assert_close(s.entropy(), t.entropy(), rtol=rt, atol=rt)
        torch.testing.assert_close(s.log_scale, s.scale.log(), rtol=rt, atol=rt)
    e = s.expand(torch.Size([2, 100]))
    assert isinstance(e, StableNormal) and e.log_scale.shape == (2, 100)


def test_stable_normal_zero_scale_is_valid():
    prev = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(True)
    try:
        with pytest.raises(ValueError):  # what the check would do to a plain Normal
            Normal(torch.zeros(2), torch.zeros(2))
        s = StableNormal.from_raw(torch.zeros(2), torch.tensor([-200.0, 0.0]), "upbounded1")
        assert s.scale[0].item() == 0.0 and torch.isfinite(s.log_scale).all()
        assert torch.isfinite(s.log_prob(torch.zeros(2))).all()
        assert torch.isfinite(s.entropy()).all()
        draw = s.rsample()
        assert torch.isfinite(draw).all() and draw[0].item() == 0.0
        assert torch.isfinite(kl_divergence(s, StableNormal.from_raw(torch.zeros(2), torch.zeros(2), "cst1"))).all()
    finally:
        torch.distributions.Distribution.set_default_validate_args(prev)
