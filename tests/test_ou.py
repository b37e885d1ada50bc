"""The OU semigroup's facts, checked by Monte Carlo against bounds computed from the samples."""
import math

import pytest
import torch

from vaepatch import ou

HERMITE = {  # probabilists' Hermite polynomials He_n
    0: lambda x: torch.ones_like(x),
    1: lambda x: x,
    2: lambda x: x ** 2 - 1,
    3: lambda x: x ** 3 - 3 * x,
    4: lambda x: x ** 4 - 6 * x ** 2 + 3,
}
M, S = 0.7, 1.8  # the Normal z was drawn from


def h(n, z):
    """Normalized Hermite polynomial of the standardized z: orthonormal under N(M, S)."""
    return HERMITE[n]((z - M) / S) / math.sqrt(math.factorial(n))


def _mc_bound(values, k=6.0):
    """k standard errors of a Monte-Carlo mean over dim 0, from the samples themselves."""
    return k * values.std(dim=0) / math.sqrt(values.shape[0])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_hermite_polynomials_are_eigenfunctions(n, rho):
    torch.manual_seed(n)
    z = torch.tensor([-2.0, 0.3, 1.1, 4.0], dtype=torch.float64)
    copies = ou.correlated(z, M, S, rho, 200_000)
    values = h(n, copies)
    got = values.mean(dim=0)
    assert torch.all((got - rho ** n * h(n, z)).abs() <= _mc_bound(values))
    # and smooth() gives the same estimate from the same noise
    eps = torch.randn(4000, 4, dtype=torch.float64)
    smoothed = ou.smooth(lambda x: h(n, x), z, M, S, rho, 4000, eps=eps)
    assert torch.allclose(smoothed, h(n, ou.correlated(z, M, S, rho, 4000, eps=eps)).mean(0))


def test_mean_is_preserved_and_variance_shrinks_by_rho_squared_per_degree():
    torch.manual_seed(0)
    rho, coef = 0.8, {0: 0.5, 1: 1.0, 2: -2.0, 3: 0.7}
    f = lambda x: sum(c * h(n, x) for n, c in coef.items())  # noqa: E731
    z = M + S * torch.randn(200_000, dtype=torch.float64)
    samples = 16
    smoothed = ou.smooth(f, z, M, S, rho, samples)
    exact = sum(c * rho ** n * h(n, z) for n, c in coef.items())  # U_ρ f in closed form
    assert abs(smoothed.mean() - coef[0]) < 6 * smoothed.std() / math.sqrt(len(z))  # mean of f is f̂_0
    var_expected = sum(rho ** (2 * n) * c ** 2 for n, c in coef.items() if n > 0)  # Σ ρ^2n f̂_n²
    var_unsmoothed = sum(c ** 2 for n, c in coef.items() if n > 0)
    assert exact.var().item() == pytest.approx(var_expected, rel=0.05)
    # the K-sample estimate adds (Var f − Var U_ρ f) / K on top (law of total variance)
    with_mc_noise = var_expected + (var_unsmoothed - var_expected) / samples
    assert smoothed.var().item() == pytest.approx(with_mc_noise, rel=0.05)
    assert with_mc_noise < 0.5 * var_unsmoothed


def test_rho_one_is_exactly_the_identity_and_calls_f_on_z_itself():
    z = torch.randn(7, 3)
    calls = []
    f = lambda x: calls.append(x.shape) or torch.sin(x) * 3  # noqa: E731
    assert torch.equal(ou.smooth(f, z, 0.0, 1.0, 1.0, 5), torch.sin(z) * 3)
    assert calls == [z.shape]
    assert torch.equal(ou.correlated(z, 0.3, 2.0, 1.0, 4), z.expand(4, 7, 3))


def test_rho_zero_is_the_mean_under_the_drawing_normal():
    torch.manual_seed(1)
    z = torch.tensor([-5.0, 0.0, 5.0], dtype=torch.float64)
    values = ((ou.correlated(z, M, S, 0.0, 100_000)) ** 2)
    assert torch.all((values.mean(0) - (M ** 2 + S ** 2)).abs() <= _mc_bound(values))  # independent of z


def test_f_is_called_once_on_all_copies_and_tuples_are_averaged():
    z = torch.randn(6, 2)
    shapes = []

    def head(x):
        shapes.append(tuple(x.shape))
        return x.sum(-1, keepdim=True), x.abs()

    mu, sigma = ou.smooth(head, z, torch.zeros(6, 2), torch.ones(6, 2), 0.9, 5)
    assert shapes == [(30, 2)] and mu.shape == (6, 1) and sigma.shape == (6, 2)


def test_gradients_flow_to_z_loc_and_scale():
    z = torch.randn(4, 3, requires_grad=True)
    loc = torch.zeros(4, 3, requires_grad=True)
    scale = torch.ones(4, 3, requires_grad=True)
    ou.smooth(torch.tanh, z, loc, scale, 0.9, 5).sum().backward()
    for t in (z, loc, scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_bad_arguments_are_named():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="rho must be in"):
        ou.correlated(z, 0, 1, 1.5, 5)
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        ou.smooth(torch.tanh, z, 0, 1, 0.9, 0)
    with pytest.raises(ValueError, match="eps must have shape"):
        ou.correlated(z, 0, 1, 0.9, 3, eps=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="keep the batch dimension"):
        ou.smooth(lambda x: x.sum(0, keepdim=True), torch.zeros(3, 2), 0, 1, 0.5, 4)
