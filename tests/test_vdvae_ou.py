"""OU-smoothed priors on the real openai/vdvae (needs the clone; skipped with the reason otherwise)."""
import pytest
import torch

import vaepatch
from vaepatch import scales
from vaepatch.variant import OU
from tests.vdvae_support import require_vdvae, vdvae_clone

CLONE, WHY_NOT = vdvae_clone()
pytestmark = pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")
# both kinds of link between blocks: same resolution (4x2 after 4m1) and a mixin (8m4 after 4x2)
DEC = "1x1,4m1,4x2,8m4,16m8,32m16"


@pytest.fixture(autouse=True)
def _clean():
    require_vdvae()
    vaepatch.revert()
    yield
    vaepatch.revert()


@pytest.fixture
def model():
    from vaepatch.targets.vdvae.tiny import tiny_vae

    torch.manual_seed(0)
    m = tiny_vae(seed=0, dec_blocks=DEC)[1]
    for block in m.decoder.dec_blocks:  # upstream zero-inits the prior heads: give them something to smooth
        torch.nn.init.normal_(block.prior.c4.weight, std=0.3)
    return m


@pytest.fixture
def batch():
    from vaepatch.targets.vdvae.tiny import batch as cifar_like_batch

    return cifar_like_batch(4, seed=0)[0]


def _loss(model, batch, seed=1, grad=True):
    torch.manual_seed(seed)
    with torch.set_grad_enabled(grad):
        return model(batch, batch)["elbo"]


def _sources(model, batch, variant):
    """Run one training pass and keep, per block, its input x and the OU source it received."""
    from vaepatch.targets.vdvae import patch as target

    seen = []
    original = target.smoothed_prior

    def spy(block, x, source, ou_option, prior, eps=None):
        seen.append((block, x.detach(), source))
        return original(block, x, source, ou_option, prior, eps)

    target.smoothed_prior = spy
    try:
        vaepatch.apply(variant, target="vdvae")
        _loss(model, batch)
    finally:
        target.smoothed_prior = original
    return seen


def test_rho_one_is_the_plain_model_exactly(model, batch):
    vaepatch.apply("upbounded1", target="vdvae")
    plain = _loss(model, batch).item()
    vaepatch.apply("upbounded1,ou=1x5", target="vdvae")
    assert _loss(model, batch).item() == plain


def test_smoothing_changes_training_loss_but_not_eval(model, batch):
    vaepatch.apply("upbounded1", target="vdvae")
    plain_train, plain_eval = _loss(model, batch).item(), _loss(model, batch, grad=False).item()
    vaepatch.apply("upbounded1,ou=0.5x5", target="vdvae")
    assert _loss(model, batch).item() != plain_train
    assert _loss(model, batch, grad=False).item() == plain_eval  # evaluation uses the unsmoothed model
    model.eval()
    assert _loss(model, batch).item() == plain_eval


def test_the_deterministic_path_is_redone_exactly_at_rho_one(model, batch):
    """smoothed_prior at ρ = 1 must give back the block's own prior head output — for a block fed by
    the previous block at the same resolution and for one fed through a mixin upsampling."""
    from vaepatch.targets.vdvae.ou import smoothed_prior
    from vaepatch.targets.vdvae.ou import split_prior as _split_prior

    seen = _sources(model, batch, "upbounded1,ou=0.5x3")
    kinds = {block.mixin is None for block, _, _ in seen}
    assert kinds == {True, False} and len(seen) == len(model.decoder.dec_blocks) - 1
    prior = scales.get("upbounded1")
    for block, x, source in seen:
        with torch.no_grad():
            mean, log_scale = smoothed_prior(block, x, source, OU(1.0, 3), prior)
            pm, pv, _ = _split_prior(block, x)
        torch.testing.assert_close(mean, pm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(log_scale, prior(pv)[1], rtol=1e-5, atol=1e-6)


def test_smoothing_lowers_the_variance_of_the_prior_across_posterior_draws(model, batch):
    from vaepatch.targets.vdvae.ou import OUSource, smoothed_prior

    seen = _sources(model, batch, "upbounded1,ou=0.5x3")
    prior = scales.get("upbounded1")
    block, x, source = next(s for s in seen if s[0].mixin is None)
    spread = {}
    for rho in (1.0, 0.5):
        means = []
        for draw in range(12):
            torch.manual_seed(100 + draw)
            z = source.loc + source.scale * torch.randn_like(source.loc)  # another posterior draw
            with torch.no_grad():
                mean, _ = smoothed_prior(block, x, OUSource(source.block, source.x, z, source.loc, source.scale),
                                         OU(rho, 32), prior)
            means.append(mean)
        spread[rho] = torch.stack(means).var(dim=0).mean().item()
    assert spread[0.5] < 0.5 * spread[1.0]


def test_ou_training_step_has_finite_gradients(model, batch):
    vaepatch.apply("explin-cst1,ou=0.9x5", target="vdvae")
    loss = _loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    vaepatch.revert()
    import vae

    assert "forward" in vae.Decoder.__dict__ and vae.Decoder.forward.__module__ == "vae"
