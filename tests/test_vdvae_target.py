"""vaepatch.apply(..., target="vdvae") against a real openai/vdvae clone at the pinned commit.

Every test here needs the clone ($VAEPATCH_VDVAE or third_party/vdvae); without one each
is skipped with a message saying so and how to get it (`vaepatch fetch vdvae`).
"""
import numpy as np
import pytest
import torch

import vaepatch
from vaepatch.patching import PatchSet
from tests.vdvae_support import require_vdvae, vdvae_clone

CLONE, WHY_NOT = vdvae_clone()
pytestmark = pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")

TABLE4 = ["vanilla", "upbounded1", "explin", "vanilla-cst1", "upbounded1-cst1", "explin-cst1"]


def _np_log_sigma(name, raw):
    """Independent float64 reference of log sigma for the parameterizations the variants use."""
    raw = np.asarray(raw, dtype=np.float64)
    if name in ("exp", "upstream"):
        return raw
    if name == "explin":
        return np.where(raw <= 0, raw, np.log(1.0 + np.maximum(raw, 0)))
    if name == "upbounded(1)":
        sigma = np.where(raw <= 0, 0.5 * np.exp(np.minimum(raw, 0)), 0.5 * (2 - np.exp(-np.maximum(raw, 0))))
        return np.log(sigma)
    if name == "constant(1)":
        return np.zeros_like(raw)
    raise AssertionError(name)


def _np_kl(m1, l1, m2, l2):
    s1, s2 = np.exp(l1), np.exp(l2)
    return np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


@pytest.fixture(autouse=True)
def _clean():
    require_vdvae()
    vaepatch.revert()
    yield
    vaepatch.revert()


@pytest.fixture
def model():
    from vaepatch.targets.vdvae.tiny import tiny_vae

    return tiny_vae(seed=0)[1]


@pytest.fixture
def batch():
    from vaepatch.targets.vdvae.tiny import batch as cifar_like_batch

    return cifar_like_batch(4, seed=0)[0]


def _capture_heads(model):
    """Record each block's raw posterior (qm, qv) and prior (pm, pv) head outputs."""
    records, hooks = [], []
    for block in model.decoder.dec_blocks:
        rec = {}
        records.append(rec)
        z = block.zdim

        def enc_hook(mod, inp, out, rec=rec):
            rec["qm"], rec["qv"] = [t.detach().double().numpy() for t in out.chunk(2, dim=1)]

        def prior_hook(mod, inp, out, rec=rec, z=z):
            rec["pm"], rec["pv"] = out[:, :z].detach().double().numpy(), out[:, z:2 * z].detach().double().numpy()

        hooks += [block.enc.register_forward_hook(enc_hook), block.prior.register_forward_hook(prior_hook)]
    return records, hooks


def _originals():
    import vae
    import vae_helpers

    return {
        "sample": vae.DecBlock.__dict__["sample"], "sample_uncond": vae.DecBlock.__dict__["sample_uncond"],
        "h_kl": vae_helpers.gaussian_analytical_kl, "h_draw": vae_helpers.draw_gaussian_diag_samples,
        "v_kl": vae.gaussian_analytical_kl, "v_draw": vae.draw_gaussian_diag_samples,
    }


def _elbo(model, batch, seed=1):
    torch.manual_seed(seed)
    return model(batch, batch)["elbo"].item()


@pytest.mark.parametrize("name", TABLE4 + ["posterior=explin,prior=upbounded(1)"])
def test_kl_matches_float64_reference(model, batch, name):
    variant = vaepatch.Variant.parse(name)
    vaepatch.apply(variant, target="vdvae")
    # perturb the zero-initialised prior heads so the prior side is not trivially 0
    with torch.no_grad():
        for block in model.decoder.dec_blocks:
            block.prior.c4.weight.normal_(0, 0.3)
    records, hooks = _capture_heads(model)
    acts = model.encoder(batch)
    _, stats = model.decoder(acts)
    for h in hooks:
        h.remove()
    if variant.is_vanilla:  # upstream's own numbers: log sigma = raw on both sides
        post = prior = "upstream"
    else:
        post = variant.posterior.spec if variant.posterior else "upstream"
        prior = variant.prior.spec if variant.prior else "upstream"
    for rec, st in zip(records, stats):
        ref = _np_kl(rec["qm"], _np_log_sigma(post, rec["qv"]), rec["pm"], _np_log_sigma(prior, rec["pv"]))
        np.testing.assert_allclose(st["kl"].detach().double().numpy(), ref, rtol=2e-4, atol=2e-5)


def test_revert_restores_identity_and_numbers_bit_for_bit(model, batch):
    before, vanilla_elbo = _originals(), _elbo(model, batch)
    vaepatch.apply("upbounded1", target="vdvae")
    assert all(_originals()[k] is not before[k] for k in before)
    patched_elbo = _elbo(model, batch)
    assert patched_elbo != vanilla_elbo
    vaepatch.revert()
    after = _originals()
    assert all(after[k] is before[k] for k in before)
    assert _elbo(model, batch) == vanilla_elbo


def test_vanilla_is_no_patch(model, batch):
    before, plain = _originals(), _elbo(model, batch)
    handle = vaepatch.apply("vanilla", target="vdvae")
    assert handle.patchset.patches == []
    assert all(_originals()[k] is before[k] for k in before)
    assert _elbo(model, batch) == plain


def test_apply_twice_is_noop_and_swap_is_clean(model, batch):
    before = _originals()
    first = vaepatch.apply("explin", target="vdvae")
    sample = _originals()["sample"]
    assert vaepatch.apply("explin", target="vdvae") is first
    assert _originals()["sample"] is sample
    second = vaepatch.apply("upbounded1", target="vdvae")
    assert not first.patchset.applied and second.patchset.applied
    assert vaepatch.active()["vdvae"].name == "upbounded1"
    explin_free = _elbo(model, batch)
    vaepatch.revert()
    assert all(_originals()[k] is before[k] for k in before)
    with vaepatch.patched("upbounded1", target="vdvae"):
        assert _elbo(model, batch) == explin_free
    assert all(_originals()[k] is before[k] for k in before)


def test_fingerprints_match_the_pinned_clone():
    import vae
    import vae_helpers
    from vaepatch.targets.vdvae import patch as target

    patches = target.build(vaepatch.Variant.parse("upbounded1"), {"vae": vae, "vae_helpers": vae_helpers})
    assert PatchSet(patches).check() == []
    assert sum(p.fingerprint is not None for p in patches) == 4


def test_startup_prior_scale(model, batch):
    """Upstream zero-initialises the prior head: sigma_p starts at 1 (vanilla), 0.5 (UpBounded1)."""
    from vaepatch import scales

    raw = [block.prior(torch.zeros(1, block.widths[block.base], block.base, block.base))[:, block.zdim:2 * block.zdim]
           for block in model.decoder.dec_blocks]
    assert all(torch.all(r == 0) for r in raw)
    assert scales.get("exp")(raw[0])[0].unique().tolist() == [1.0]
    assert scales.get("upbounded1")(raw[0])[0].unique().tolist() == [0.5]
    assert scales.get("cst1")(raw[0])[0].unique().tolist() == [1.0]


def test_uncond_temperatures_per_block_and_set_latents(model, batch):
    vaepatch.apply("upbounded1-cst1", target="vdvae")
    n_blocks = len(model.decoder.dec_blocks)
    out = model.forward_uncond_samples(3, t=[0.5] * n_blocks)
    assert out.shape == (3, 32, 32, 3)
    stats = model.forward_get_latents(batch)
    latents = [s["z"][:1] for s in stats[:2]]
    torch.manual_seed(0)
    a = model.forward_samples_set_latents(1, latents, t=0.2)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(np.asarray(a, dtype=np.float64)).all()


def test_first_block_temperature_is_exact(model):
    """The first block's input does not depend on t, so z - pm must scale exactly by t."""
    vaepatch.apply("upbounded1", target="vdvae")
    with torch.no_grad():
        model.decoder.dec_blocks[0].prior.c4.weight.normal_(0, 0.3)
    block = model.decoder.dec_blocks[0]
    seen = []
    hz = block.z_proj.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    hp = block.prior.register_forward_hook(lambda m, i, o: seen.append(o[:, :block.zdim].detach().clone()))
    for t in (1.0, 0.25):
        torch.manual_seed(7)
        model.decoder.forward_uncond(2, t=t)
    hz.remove()
    hp.remove()
    pm1, z1, pm2, z2 = seen[0], seen[1], seen[2], seen[3]
    torch.testing.assert_close(pm1, pm2)
    torch.testing.assert_close(z2 - pm2, 0.25 * (z1 - pm1), rtol=1e-5, atol=1e-6)


def test_temperature_multiplies_the_prior_sigma_in_a_later_block(model):
    """Temperature multiplies sigma; adding log t to the raw scale agrees with that for UpBounded1 only where
    the raw scale and raw + log t are both <= 0, as in the first block (raw scale exactly 0) at t < 1. So
    block 1, raw scales on both sides of 0, at t = 0.25 and 2: its input comes from block 0's draw, the same
    at every t with t = 1 in block 0 and one seed."""
    vaepatch.apply("upbounded1", target="vdvae")
    block, n = model.decoder.dec_blocks[1], len(model.decoder.dec_blocks)
    with torch.no_grad():  # raw prior scales spread over [-1.5, 1.5] (the weights alone give |raw| < 0.01)
        block.prior.c4.weight.normal_(0, 0.3)
        block.prior.c4.bias[block.zdim:2 * block.zdim] = torch.linspace(-1.5, 1.5, block.zdim)
    seen = []
    hz = block.z_proj.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    hp = block.prior.register_forward_hook(lambda m, i, o: seen.append(o[:, :2 * block.zdim].detach().clone()))
    for t in (1.0, 0.25, 2.0):
        torch.manual_seed(7)
        model.decoder.forward_uncond(2, t=[1.0, t] + [1.0] * (n - 2))
    hz.remove()
    hp.remove()
    (p1, z1), (p_low, z_low), (p_high, z_high) = zip(seen[0::2], seen[1::2])
    pm, pv = p1.split(block.zdim, dim=1)
    assert (pv > 1).any() and (pv < -1).any()  # well on both sides of 0, where adding log t to it goes wrong
    torch.testing.assert_close(p_low, p1)
    torch.testing.assert_close(p_high, p1)
    torch.testing.assert_close(z_low - pm, 0.25 * (z1 - pm), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_high - pm, 2.0 * (z1 - pm), rtol=1e-5, atol=1e-6)


def test_missing_clone_is_a_clear_error(tmp_path):
    from vaepatch.upstream import UpstreamError

    with pytest.raises(UpstreamError, match="vaepatch fetch"):
        vaepatch.apply("upbounded1", target="vdvae", upstream=tmp_path / "nowhere")


def test_unknown_target_and_variant():
    with pytest.raises(ValueError, match="supported: vdvae"):
        vaepatch.apply("upbounded1", target="nope")
    with pytest.raises(ValueError, match="unknown variant"):
        vaepatch.apply("upbounded2x", target="vdvae")


def test_two_clones_and_nothing_imported_asks_for_a_target():
    import subprocess
    import sys

    from vaepatch import upstream

    try:
        nvae = upstream.locate("nvae")
    except upstream.UpstreamError:
        nvae = None
    if nvae is None:
        pytest.skip("SKIPPED, needs an NVlabs/NVAE clone too (vaepatch fetch nvae) to be ambiguous")
    code = "import vaepatch\ntry:\n    vaepatch.apply('upbounded1')\nexcept ValueError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "target='vdvae'" in out and "target='nvae'" in out
    # once one upstream is imported, it is the default
    code = "import sys; sys.path.insert(0, %r)\nimport vae, vae_helpers, vaepatch\nprint(vaepatch.apply('upbounded1').target)\n" % str(CLONE)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() == "vdvae"
