"""OU-smoothed priors on the real NVlabs/NVAE (needs the clone; skipped with the reason otherwise).

The tiny model has both links between groups (same scale, and across a scale change with its
upsampling cell), both batch-norm kinds, squeeze-excitation; it is run with and without the
residual posterior and a flow, the parts the smoothing has to see through.
"""
import dataclasses

import pytest
import torch

import vaepatch
from vaepatch import scales
from vaepatch.variant import OU
from tests.nvae_support import cifar_like, nvae_clone, tiny_model

CLONE, WHY_NOT = nvae_clone()
pytestmark = pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")
SHAPES = [dict(res_dist=False, num_nf=0), dict(res_dist=True, num_nf=1)]


@pytest.fixture(autouse=True)
def _clean(nvae):
    vaepatch.revert("nvae")
    yield
    vaepatch.revert("nvae")


def _model(**shape):
    m = tiny_model(seed=0, **shape)
    with torch.no_grad():
        for head in m.dec_sampler:  # prior heads whose output depends clearly on the latent above
            torch.nn.init.normal_(head[1].weight, std=0.5)
    return m


def _loss(model, x, seed=1, grad=True):
    """NVAE's training loss (reconstruction + KL, no balancing) and the parameters' gradients."""
    import utils

    model.zero_grad()
    torch.manual_seed(seed)
    with torch.set_grad_enabled(grad):
        logits, _, _, kl_all, _ = model(x)
        loss = (utils.reconstruction_loss(model.decoder_output(logits), x, crop=False) + sum(kl_all)).mean()
    if grad:
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _spy(monkeypatch, change=None):
    """Calls of nvae_ou.smoothed_prior in the next passes: (args, result); ``change`` edits the args."""
    from vaepatch.targets.nvae import ou as nvae_ou

    calls, original = [], nvae_ou.smoothed_prior

    def spy(source, head, option, prior, parts, eps=None):
        args = (source, head, option, prior, parts, eps)
        if change is not None:
            args = change(*args)
        calls.append((args, original(*args)))
        return calls[-1][1]

    monkeypatch.setattr(nvae_ou, "smoothed_prior", spy)
    return calls


def test_rho_one_is_the_plain_model_exactly(nvae):
    model, x = _model(**SHAPES[1]), cifar_like(4)
    vaepatch.apply("upbounded1", target="nvae")
    plain = _loss(model, x)[0]
    vaepatch.apply("upbounded1,ou=1x5", target="nvae")
    assert _loss(model, x)[0] == plain


@pytest.mark.parametrize("shape", SHAPES, ids=["plain", "res_dist+flow"])
def test_copies_redo_the_path_to_each_prior_exactly_at_rho_one(nvae, monkeypatch, shape):
    """Forced through the copies at rho = 1 (noise fixed to zero, so no random draw moves), the
    loss and every gradient must be the plain model's: the copy path is the real path, batch
    statistics and their gradients included."""
    model, x = _model(**shape), cifar_like(4)
    vaepatch.apply("upbounded1", target="nvae")
    plain, plain_grads = _loss(model, x)
    vaepatch.apply("upbounded1,ou=0.5x3", target="nvae")

    def at_rho_one(source, head, option, prior, parts, eps):
        return source, head, dataclasses.replace(option, rho=1.0), prior, parts, torch.zeros(3, *source.z0.shape)

    calls = _spy(monkeypatch, at_rho_one)
    through_copies, grads = _loss(model, x)
    assert len(calls) == len(model.dec_sampler) == 3
    assert all(len(args[0].flows) == shape["num_nf"] for args, _ in calls)
    assert through_copies == pytest.approx(plain, rel=1e-6)
    assert grads.keys() == plain_grads.keys()
    scale = max(g.abs().max() for g in plain_grads.values())
    for name, g in plain_grads.items():  # near-zero gradients (a bias before a batch norm) are rounding
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_smoothing_changes_the_training_loss_but_not_eval_or_sampling(nvae):
    model, x = _model(**SHAPES[1]), cifar_like(4)
    vaepatch.apply("upbounded1", target="nvae")
    plain_train, plain_eval = _loss(model, x)[0], _loss(model, x, grad=False)[0]
    torch.manual_seed(3)
    with torch.no_grad():
        plain_sample = model.sample(2, 1.0)
    vaepatch.apply("upbounded1,ou=0.5x5", target="nvae")
    assert _loss(model, x)[0] != plain_train
    assert _loss(model, x, grad=False)[0] == plain_eval  # no gradients: the unsmoothed model
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(model.sample(2, 1.0), plain_sample)
    model.eval()  # eval mode with gradients on: still the unsmoothed model
    smoothed_eval = _loss(model, x)[0]
    vaepatch.apply("upbounded1", target="nvae")
    assert _loss(model, x)[0] == smoothed_eval


def test_the_prior_in_the_kl_is_the_smoothed_one_and_the_posterior_is_not(nvae, monkeypatch):
    """With --res_dist, q and p are built from the same head output: only p may be smoothed."""
    distributions = nvae["distributions"]
    model, x = _model(res_dist=True, num_nf=0), cifar_like(4)  # without flows NVAE's KL is Normal.kl
    vaepatch.apply("upbounded1,ou=0.5x3", target="nvae")
    calls = _spy(monkeypatch)
    pairs, kl = [], distributions.Normal.kl
    monkeypatch.setattr(distributions.Normal, "kl", lambda q, p: pairs.append((q, p)) or kl(q, p))
    _loss(model, x)
    assert len(pairs) == 4 and len(calls) == 3  # the top group's prior N(0, I) is not smoothed
    for (_, result), (q, p) in zip(calls, pairs[1:]):
        mean, sigma, log_sigma = result
        assert p.mu is mean and p.sigma is sigma and p.log_sigma is log_sigma
        assert q.mu is not mean and not torch.equal(q.mu, mean)
    assert torch.equal(pairs[0][1].mu, torch.zeros_like(pairs[0][1].mu))


def test_smoothing_lowers_the_variance_of_the_prior_across_posterior_draws(nvae, monkeypatch):
    from vaepatch.targets.nvae.ou import smoothed_prior

    model, x = _model(**SHAPES[1]), cifar_like(4)
    vaepatch.apply("upbounded1,ou=0.5x3", target="nvae")
    calls = _spy(monkeypatch)
    _loss(model, x)
    (source, head, _, prior, parts, _), _ = calls[0]
    spread = {}
    for rho in (1.0, 0.5):
        means, sigmas = [], []
        for draw in range(12):
            torch.manual_seed(100 + draw)
            z0 = source.loc + source.scale * torch.randn_like(source.loc)  # another posterior draw
            with torch.no_grad():
                mean, sigma, _ = smoothed_prior(dataclasses.replace(source, z0=z0), head, OU(rho, 32), prior, parts)
            means.append(mean)
            sigmas.append(sigma)
        spread[rho] = [torch.stack(v).var(dim=0).mean().item() for v in (means, sigmas)]
    assert spread[1.0][0] > 0 and spread[0.5][0] < 0.5 * spread[1.0][0]
    assert spread[1.0][1] > 0 and spread[0.5][1] < 0.5 * spread[1.0][1]


def test_copies_move_no_running_statistic_and_leave_no_hook(nvae):
    from torch.nn.modules.batchnorm import _BatchNorm

    model, x = _model(**SHAPES[1]), cifar_like(4)
    vaepatch.apply("upbounded1,ou=0.5x5", target="nvae")
    _loss(model, x)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(m.num_batches_tracked.item() == 1 for m in norms)  # the real pass only
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m)
               for m in model.modules())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
def test_an_ou_training_step_has_finite_gradients(nvae, dtype):
    import utils

    model, x = _model(**SHAPES[1]), cifar_like(4)
    vaepatch.apply("explin-cst1,ou=0.9x5", target="nvae")
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        logits, _, _, kl_all, _ = model(x)
        loss = (utils.reconstruction_loss(model.decoder_output(logits), x, crop=False) + sum(kl_all)).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and len(grads) > 0.9 * len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    heads = [p.grad for h in model.dec_sampler for p in h.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in heads)


def test_prior_scale_of_the_variant_reaches_the_smoothed_prior(nvae, monkeypatch):
    """vanilla-cst1's prior has sigma = 1 whatever the head says: so must its smoothed prior."""
    model, x = _model(**SHAPES[0]), cifar_like(4)
    vaepatch.apply("vanilla-cst1,ou=0.5x3", target="nvae")
    calls = _spy(monkeypatch)
    _loss(model, x)
    assert calls and str(calls[0][0][3]) == str(scales.get("constant(1)"))
    for _, (_, sigma, log_sigma) in calls:
        assert torch.equal(sigma, torch.ones_like(sigma)) and torch.equal(log_sigma, torch.zeros_like(log_sigma))


def test_ou_cost_measures_the_tiny_nvae(nvae):
    """bench ou-cost on NVAE (its own spawned interpreter): K copies cost more FLOPs and more saved
    activations than plain, and fewer FLOPs than K + 1 plain steps (the copies redo part of a step)."""
    from vaepatch.bench.cost import ou_smoothing as ou_cost

    plain, smoothed = ou_cost.measure_upstream("nvae", [3], steps=1, warmup=0, rss_steps=0, threads=1)
    assert (plain["config"], smoothed["config"]) == ("plain", "ou rho=0.9 K=3")
    assert plain["reference"].startswith("tiny nvae") and plain["seconds"] > 0 and smoothed["seconds"] > 0
    assert 1.05 < smoothed["flop_ratio"] < 1 + 3 and smoothed["saved_ratio"] > 1.05
