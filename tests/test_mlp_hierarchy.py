"""The MLP hierarchy of Pervez & Gavves: shapes, OU smoothing in training only, bounds, active units."""
import math

import pytest
import torch

from vaepatch.models import MLPHierarchy, count_active
from vaepatch.models.mlp_hierarchy import binarize
from vaepatch.models.mlp_training import train
from vaepatch.variant import OU

SMALL = dict(x_dim=30, latents=(6, 5, 4), hidden=24)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(variant=None, seed=0, **kw):
    torch.manual_seed(seed)
    return MLPHierarchy(**{**SMALL, **kw}, variant=variant)


def _twin(model, variant):
    """Same weights, another variant."""
    twin = MLPHierarchy(model.x_dim, model.latents, model.hidden, variant=variant)
    twin.load_state_dict(model.state_dict())
    return twin


def _x(n=16, d=30, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


def _loss(model, x, seed=1):
    torch.manual_seed(seed)
    return model(x)


def test_default_is_the_papers_architecture():
    m = MLPHierarchy()
    assert m.latents == (40, 40, 40, 40) and m.x_dim == 784
    assert len(m.encoders) == 4 and len(m.priors) == 3
    linears = [l for l in m.encoders[0] if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(784, 200), (200, 200), (200, 80)]
    assert all(isinstance(a, torch.nn.Tanh) for a in (m.encoders[0][1], m.encoders[0][3]))
    assert [(l.in_features, l.out_features) for l in m.decoder if isinstance(l, torch.nn.Linear)][-1] == (200, 784)
    assert m.posterior_scale.name == "exp" and m.prior_scale.name == "exp" and m.ou is None


def test_shapes_and_terms():
    m = _model("upbounded1,ou=0.9x3")
    x = _x()
    out = _loss(m, x)
    assert out["loss"].shape == () and out["loss"].requires_grad
    assert out["kl_per_layer"].shape == (3,) and bool((out["kl_per_layer"] >= 0).all())
    assert torch.allclose(-out["elbo"], out["recon"] + out["kl_per_layer"].sum())
    layers, logits = m.trace(x)
    assert logits.shape == (16, 30)
    assert [l["z"].shape for l in layers] == [(16, 6), (16, 5), (16, 4)]
    assert m.posterior_scale.name == "upbounded" and bool((layers[0]["scale"] < 1).all())
    ev = m.evaluate(x, k=3)
    assert len(ev["kl_per_layer"]) == 3 and math.isfinite(ev["elbo"]) and math.isfinite(ev["iw_bound"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_rho_one_is_the_plain_training_loss_exactly():
    plain = _model("vanilla")
    smooth = _twin(plain, "vanilla,ou=1.0x5")
    x = _x()
    a, b = _loss(plain, x), _loss(smooth, x)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["kl_per_layer"], b["kl_per_layer"])
    a["loss"].backward()
    b["loss"].backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), smooth.parameters()))


def test_smoothing_changes_training_loss_not_the_data_path_nor_evaluation():
    plain = _model("vanilla")
    smooth = _twin(plain, "vanilla,ou=0.5x4")
    x = _x()
    a, b = _loss(plain, x), _loss(smooth, x)
    assert not torch.allclose(a["loss"], b["loss"])
    assert torch.equal(a["recon"], b["recon"])  # the data path keeps the real posterior sample
    assert torch.equal(a["kl_per_layer"][-1], b["kl_per_layer"][-1])  # the top prior is fixed
    assert not torch.allclose(a["kl_per_layer"][:-1], b["kl_per_layer"][:-1])
    torch.manual_seed(3)
    ev_a = plain.evaluate(x, k=7)
    torch.manual_seed(3)
    ev_b = smooth.evaluate(x, k=7)
    assert ev_a == ev_b
    smooth.eval()  # eval mode is the plain model too
    assert torch.equal(_loss(plain.eval(), x)["loss"], _loss(smooth, x)["loss"])


def test_the_k_copies_go_through_each_prior_net_in_one_batched_call():
    m = _model("vanilla,ou=0.8x6")
    calls = []
    for i, net in enumerate(m.priors):
        net.register_forward_hook(lambda mod, inp, out, i=i: calls.append((i, inp[0].shape[0])))
    _loss(m, _x(n=10))
    assert sorted(calls) == [(0, 60), (1, 60)]


def test_smoothed_prior_varies_less_across_posterior_draws():
    m = _model("vanilla", x_dim=30, latents=(6, 5), hidden=24)
    for p in m.priors.parameters():  # a prior net that actually depends on its input
        torch.nn.init.normal_(p, std=0.6)
    torch.manual_seed(0)
    loc, scale = torch.randn(1, 5) * 0.5, torch.full((1, 5), 0.8)
    z = loc + scale * torch.randn(4000, 5)  # posterior draws of z_2 for one fixed posterior
    with torch.no_grad():
        plain_loc, plain_log_scale = m.prior(0, z)
        smooth_loc, smooth_log_scale = m.smoothed_prior(0, z, loc, scale, OU(0.5, 10))
        same_loc, same_log_scale = m.smoothed_prior(0, z, loc, scale, OU(1.0, 10))
    # exact smoothing would give <= rho^2 = 0.25 of the variance; K = 10 copies add <= 1/K
    assert smooth_loc.var(0).sum() < 0.6 * plain_loc.var(0).sum()
    assert smooth_log_scale.var(0).sum() < 0.6 * plain_log_scale.var(0).sum()
    assert torch.equal(same_loc, plain_loc) and torch.equal(same_log_scale, plain_log_scale)
    # the smoothed scale is the mean sigma over copies, taken in log space: no underflow at tiny sigma
    tiny = _model("posterior=exp,prior=exp", x_dim=30, latents=(6, 5), hidden=24)
    with torch.no_grad():
        tiny.priors[0][-1].bias[6:] = -200.0  # sigma = e^-200 underflows to 0 in float32
        _, log_scale = tiny.smoothed_prior(0, z[:8], loc, scale, OU(0.5, 4))
    assert torch.isfinite(log_scale).all() and bool((log_scale < -150).all())


def test_iw_bound_is_above_the_elbo_and_l1_is_the_elbo_in_expectation():
    m = _model("vanilla", seed=2)
    x = _x(n=50, seed=5)
    torch.manual_seed(0)
    ev = m.evaluate(x, k=30)
    assert ev["iw_bound"] > ev["elbo"]
    diffs = []
    for seed in range(20):
        torch.manual_seed(seed)
        ev1 = m.evaluate(x, k=1)
        diffs.append(ev1["iw_bound"] - ev1["elbo"])
    diffs = torch.tensor(diffs)
    assert abs(float(diffs.mean())) < 4 * float(diffs.std()) / math.sqrt(len(diffs)) + 1e-3
    assert float(diffs.abs().max()) > 0  # a different estimator, not the same number twice


def test_count_active_on_crafted_means():
    g = torch.Generator().manual_seed(0)
    noise_only = torch.randn(20, 500, 7, generator=g)  # ignores x, follows the pass's noise
    c = count_active(noise_only)
    assert c["paper"] == 7 and c["corrected"] == 0
    signal = torch.randn(1, 500, 7, generator=g) + 0.3 * torch.randn(20, 500, 7, generator=g)
    c = count_active(signal)
    assert c["paper"] == 7 and c["corrected"] == 7
    assert torch.allclose(c["corrected_variance"], torch.ones(7), atol=0.2)
    dead = 1e-3 * torch.randn(20, 500, 7, generator=g)
    assert count_active(dead)["paper"] == 0 and count_active(dead)["corrected"] == 0
    with pytest.raises(ValueError):
        count_active(noise_only[:1])


def test_active_units_paper_counts_noise_corrected_does_not():
    m = _model("vanilla", x_dim=30, latents=(6, 5), hidden=24)
    head0, head1 = m.encoders[0][-1], m.encoders[1][-1]
    x = _x(n=400)
    with torch.no_grad():
        head0.weight.zero_()  # q(z_1 | x) = N(0, 1) whatever x: z_1 is pure noise
        head0.bias.zero_()
        torch.nn.init.normal_(head1.weight, std=0.3)  # mu_2 follows that noise (Var ~ 0.1-0.6)
        torch.nn.init.normal_(m.encoders[1][0].weight, std=1.0)
    torch.manual_seed(0)
    au = m.active_units(x, passes=20)
    assert au["paper"][0] == 0 and au["corrected"][0] == 0
    assert au["paper"][1] >= 3 and au["corrected"][1] == 0
    with torch.no_grad():  # now mu_1 depends on x: counted both ways, and mu_2 through it
        torch.nn.init.normal_(head0.weight, std=1.0)
        torch.nn.init.normal_(m.encoders[0][0].weight, std=1.0)
        head0.weight[6:] = 0.0
        head0.bias[6:] = -6.0  # sigma_1 = e^-6: little noise left in z_1
    torch.manual_seed(0)
    au = m.active_units(x, passes=20)
    assert au["paper"][0] == 6 and au["corrected"][0] == 6
    assert au["corrected"][1] >= 3 and au["paper"][1] >= au["corrected"][1] - 1


def test_train_lowers_the_loss_on_binarized_data():
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 30, generator=g).round()
    grey = (protos[torch.randint(0, 4, (200,), generator=g)] * 0.9 + 0.05)
    m = _model("vanilla,ou=0.9x3")
    history = train(m, grey, steps=40, batch=20, lr=3e-3, log_every=20)
    assert [s for s, _ in history] == [20, 40]
    assert history[-1][1] < history[0][1]
    assert set(binarize((grey * 255).to(torch.uint8)).unique().tolist()) <= {0.0, 1.0}


def test_glorot_init_spreads_the_posterior_means_more_than_torchs_default():
    """Why the option exists: torch's Linear default shrinks the signal ~3x per tanh layer, so at the
    start q(z_1 | x) hardly depends on x; Glorot keeps the variance."""
    x = torch.bernoulli(torch.full((200, 784), 0.13), generator=torch.Generator().manual_seed(0))
    spread = {}
    for init in ("default", "glorot"):
        torch.manual_seed(0)
        m = MLPHierarchy(init=init)
        layers, _ = m.trace(x)
        spread[init] = float(layers[0]["loc"].detach().var(0).mean())
        if init == "glorot":
            linears = [l for l in m.modules() if isinstance(l, torch.nn.Linear)]
            assert all(float(l.bias.abs().max()) == 0 for l in linears)
            bound = math.sqrt(6 / (784 + 200))
            assert float(linears[0].weight.abs().max()) <= bound
    assert spread["glorot"] > 10 * spread["default"]
    with pytest.raises(ValueError, match="init must be one of"):
        MLPHierarchy(init="he")
