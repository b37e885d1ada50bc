"""The Efficient-VDVAE target on the real code (a tiny configuration, CPU): exact apply/revert, the fingerprint
check, every built-in variant mapped, vanilla = upstream's own loss, softplus-ln2 = vanilla where the two
parameterizations coincide, and the KL overflow of upstream's sigma-ratio KL."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import vaepatch
from tests.effvdvae_support import effvdvae_imported, require_effvdvae
from vaepatch.patching import FingerprintMismatch, FingerprintWarning
from vaepatch.targets.effvdvae import patch as effvdvae_patch
from vaepatch.targets.effvdvae.provenance import blocks

PIN = "f779c40f24bbd69129bf477593baf4792f05147e"
REPLACED = [("model.layers", "LevelBlockDown", "sampler"),
            ("model.layers", "LevelBlockDown", "get_analytical_distribution"),
            ("model.latent_layers", "GaussianLatentLayer", "forward"), ("model.losses", None, "calculate_std_loss"),
            ("model.losses", None, "calculate_logstd_loss")]


@pytest.fixture(scope="module")
def eff(tmp_path_factory):
    """Efficient-VDVAE imported once for this file (its configuration can be loaded once per interpreter)."""
    path = require_effvdvae()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with effvdvae_imported(path, tmp_path_factory.mktemp("effvdvae-config")) as modules:
            yield modules
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def settings(eff):
    """Change the loaded configuration for one test (upstream reads it at each call); restored after."""
    hparams, changed = eff["hparams"], {}

    def change(section, key, value):
        changed.setdefault((section, key), getattr(getattr(hparams, section), key))
        setattr(getattr(hparams, section), key, value)

    yield change
    for (section, key), value in changed.items():
        setattr(getattr(hparams, section), key, value)


def _owner(eff, module, cls):
    return getattr(eff[module], cls) if cls else eff[module]


def _batch(n=4, seed=0):
    """``n`` 8-bit images in Efficient-VDVAE's input convention: (N, 3, 32, 32) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 127.5 - 1.0


def _model(eff, seed=0):
    torch.manual_seed(seed)
    model = eff["model.def_model"].UniversalAutoEncoder()
    with torch.no_grad():
        model(_batch(1))  # upstream's train.py does this once: Unpoolayer makes its bias on the first call
    return model


def _loss(eff, model, x, seed=1, step=100):
    """Upstream's own training loss of ``model`` on ``x`` (train.py's compute_loss): (total, per-group KLs,
    reconstruction), with the posterior draws from ``seed``."""
    torch.manual_seed(seed)
    predictions, posterior, prior = model(x)
    recon, kls, total, _, _, _ = eff["model.model"].compute_loss(x, predictions, posterior, prior, step_n=step,
                                                                global_batch_size=x.shape[0])
    return total, [eff["model.model"].kldiv_loss(p, q, x.shape[0])[0] for p, q in zip(posterior, prior)], recon


def test_apply_and_revert_are_exact_for_every_builtin_variant(eff):
    originals = {(m, c, a): vars(_owner(eff, m, c))[a] for m, c, a in REPLACED}
    for name in vaepatch.variants():
        vaepatch.apply(name, target="effvdvae")
        changed = {key for key, value in originals.items() if vars(_owner(eff, *key[:2]))[key[2]] is not value}
        assert changed == (set() if name == "vanilla" else set(originals)), name
        vaepatch.revert("effvdvae")
        assert all(vars(_owner(eff, *key[:2]))[key[2]] is value for key, value in originals.items()), name
    assert "effvdvae" not in vaepatch.active()


def test_a_changed_upstream_function_is_refused_by_name(eff, monkeypatch):
    key = ("model.losses", "calculate_std_loss")
    monkeypatch.setitem(effvdvae_patch.FINGERPRINTS, key, "0000000000000000")
    with pytest.raises(FingerprintMismatch) as err:
        vaepatch.apply("upbounded1", target="effvdvae")
    assert "model.losses.calculate_std_loss" in str(err.value) and PIN in str(err.value)
    assert vars(eff["model.losses"])["calculate_std_loss"].__class__.__name__ != "function"  # still upstream's (jit)
    with pytest.warns(FingerprintWarning, match="calculate_std_loss"):
        vaepatch.apply("upbounded1", target="effvdvae", strict=False)
    vaepatch.revert("effvdvae")


@pytest.mark.parametrize("name", sorted(vaepatch.variants()))
def test_every_builtin_variant_sets_both_sides(eff, name):
    """Each side's sigma is the variant's parameterization of that side's raw output (upstream's where the
    variant keeps it), and the loss is finite."""
    from vaepatch.variant import Variant

    variant, model = Variant.parse(name), _model(eff)
    upstream_scale = effvdvae_patch.upstream_scale(eff["hparams"])
    block, seen = blocks(model)[2], {}
    hooks = [getattr(block, f"{side}_layer").projection.register_forward_hook(
        lambda m, a, out, side=side: seen.__setitem__(side, out.chunk(2, dim=1)[1].detach())) for side in ("prior",
                                                                                                        "posterior")]
    with vaepatch.patched(name, target="effvdvae"):
        torch.manual_seed(1)
        _, posterior, prior = model(_batch())
        total, _, _ = _loss(eff, model, _batch())
    for hook in hooks:
        hook.remove()
    assert math.isfinite(total.item())
    for side, stats in (("posterior", posterior[2]), ("prior", prior[2])):
        expected = (getattr(variant, side) or upstream_scale)(seen[side])[1]
        if name != "vanilla":
            torch.testing.assert_close(stats.log_sigma, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.log(stats[1]), expected, rtol=1e-5, atol=1e-5)  # upstream's [mean, std]


def test_vanilla_is_upstreams_own_loss(eff):
    """vaepatch's vanilla patches nothing: the same batch and seed give upstream's loss and gradients, bit for bit."""
    model, x = _model(eff), _batch()
    total, _, _ = _loss(eff, model, x)
    total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with vaepatch.patched("vanilla", target="effvdvae"):
        again, _, _ = _loss(eff, model, x)
        again.backward()
    assert again.item() == total.item()
    assert all(torch.equal(a.grad, b) for a, b in zip(model.parameters(), grads))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("spec", ["softplus-ln2", "prior=softplus(log(2))", "posterior=softplus(log(2))"])
def test_softplus_ln2_is_vanilla_where_they_coincide(eff, settings, residual, spec):
    """Upstream's default scales are softplus(ln 2 raw) / ln 2 on both sides: softplus-ln2 (or either side of it,
    the other left to upstream) gives the same loss and gradients, with its stable KL, with and without the
    residual posterior (sigma_q = softplus(raw_q) sigma_p, mapped as log sigma_p + log softplus(raw_q))."""
    settings("model", "use_residual_distribution", residual)
    model, x = _model(eff), _batch()
    total, kls, recon = _loss(eff, model, x)
    total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with vaepatch.patched(spec, target="effvdvae"):
        patched, patched_kls, patched_recon = _loss(eff, model, x)
        patched.backward()
        assert isinstance(model(x)[1][0], effvdvae_patch.Stats)  # the patched path ran
    assert patched_recon.item() == pytest.approx(recon.item(), rel=1e-6)
    torch.testing.assert_close(torch.stack(patched_kls), torch.stack(kls), rtol=1e-4, atol=1e-9)
    for a, b in zip(model.parameters(), grads):
        torch.testing.assert_close(a.grad, b, rtol=1e-3, atol=1e-6)


def test_logstd_base_upstream_side_is_exp_of_beta_raw(eff, settings):
    """distribution_base = 'logstd' (sigma = exp(beta raw)): with beta = 1 a side set to ``exp`` coincides with
    upstream's, and the side left to upstream is read as exp(beta raw): the loss is vanilla's."""
    settings("model", "distribution_base", "logstd")
    settings("model", "gradient_smoothing_beta", 1.0)
    model, x = _model(eff), _batch()
    total, kls, _ = _loss(eff, model, x)
    with vaepatch.patched("prior=exp", target="effvdvae"):
        patched, patched_kls, _ = _loss(eff, model, x)
    torch.testing.assert_close(torch.stack(patched_kls), torch.stack(kls), rtol=1e-4, atol=1e-9)
    assert patched.item() == pytest.approx(total.item(), rel=1e-6)


def _overflow_case(eff, model):
    """The first block's prior outputs raw scale -67 and mean 0, its posterior raw 0 and mean 1: a gap of 1 in
    the means against a prior sigma of softplus(-67 ln 2) / ln 2 = 1e-20."""
    block = blocks(model)[0]
    for layer, mean, raw in ((block.prior_layer, 0.0, -67.0), (block.posterior_layer, 1.0, 0.0)):
        with torch.no_grad():
            layer.projection.weight.zero_()
            half = layer.projection.bias.shape[0] // 2
            layer.projection.bias[:half], layer.projection.bias[half:] = mean, raw
    return _loss(eff, model, _batch())


@pytest.mark.parametrize("residual", [False, True])
def test_the_sigma_ratio_kl_overflows_where_the_pick_stays_finite(eff, settings, residual):
    """Upstream's KL, 0.5 (dmu / sigma_p)^2 + ..., overflows float32 at a prior raw of -67 and dmu = 1 (1 / sigma_p
    = 1e20, squared past 3.4e38); under qfloor-cst1 (prior sigma 1, posterior sigma floored) the same weights give a
    finite KL. softplus-ln2 keeps upstream's sigma: its stable KL is non-finite here too, because the true KL
    (5e39) is beyond float32 itself: what overflows is the prior's sigma, not the formula."""
    settings("model", "use_residual_distribution", residual)
    model = _model(eff)
    total, kls, _ = _overflow_case(eff, model)
    assert not math.isfinite(kls[0].item()) and not math.isfinite(total.item())
    assert all(math.isfinite(k.item()) for k in kls[1:])  # only the block whose prior was pushed there
    with vaepatch.patched("qfloor-cst1", target="effvdvae"):
        total, kls, _ = _overflow_case(eff, model)
    assert math.isfinite(total.item()) and all(math.isfinite(k.item()) for k in kls)
    with vaepatch.patched("softplus-ln2", target="effvdvae"):
        _, kls, _ = _overflow_case(eff, model)
    assert not math.isfinite(kls[0].item())


def test_stats_keep_upstreams_form_and_temperature_multiplies_sigma(eff, settings):
    model = _model(eff)
    block = blocks(model)[2]
    y = torch.randn(2, 16, 8, 8)
    with vaepatch.patched("upbounded1", target="effvdvae"):
        torch.manual_seed(0)
        z, stats = block.sampler(block.prior_layer, y)
        torch.manual_seed(0)
        cold, _ = block.sampler(block.prior_layer, y, temperature=0.5)
        assert torch.equal(stats[1], stats.sigma)  # 'std' base: [mean, std]
        torch.testing.assert_close(cold - stats[0], 0.5 * (z - stats[0]))
        settings("model", "distribution_base", "logstd")
        _, stats = block.get_analytical_distribution(block.prior_layer, y)
        torch.testing.assert_close(stats[1], stats.log_sigma / eff["hparams"].model.gradient_smoothing_beta)


def test_ou_smoothing_is_refused(eff):
    with pytest.raises(ValueError, match="does not implement for Efficient-VDVAE"):
        vaepatch.apply("upbounded1,ou=0.9x5", target="effvdvae")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vaepatch.apply("upbounded1,ou=1.0x5", target="effvdvae")  # rho = 1 is no smoothing
    vaepatch.revert("effvdvae")
