"""vaepatch.apply(..., target="nvae") against a real NVlabs/NVAE clone at the pinned commit.

A tiny ``model.AutoEncoder`` is built on CPU with vaepatch's NVAE shims (vaepatch.targets.nvae.shims) installed (and
uninstalled after). Each variant's per-group KL, log q and log p are checked against an
independent float64 computation from the raw head outputs captured during the same forward.
Every test needs the clone ($VAEPATCH_NVAE or third_party/nvae); without one each is skipped
with a message saying so and how to get it (`vaepatch fetch nvae`).
"""
import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vaepatch
from vaepatch.runs import shims as runs_shims
from vaepatch.targets.nvae import shims as nvae_shims
from vaepatch.patching import PatchSet
from tests.nvae_support import cifar_like, nvae_clone, tiny_model

CLONE, WHY_NOT = nvae_clone()
pytestmark = pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")

TABLE4 = ["vanilla", "upbounded1", "explin", "vanilla-cst1", "upbounded1-cst1", "explin-cst1"]
LOG_2PI = math.log(2 * math.pi)


@pytest.fixture(autouse=True)
def _clean(nvae):
    vaepatch.revert("nvae")
    yield
    vaepatch.revert("nvae")


# ----------------------------------------------------------------- float64 reference

def _sc(x):
    return 5.0 * np.tanh(x / 5.0)


def _np_log_sigma(spec, raw):
    """Independent float64 log sigma for the parameterizations used here."""
    raw = np.asarray(raw, dtype=np.float64)
    if spec == "softclamp":
        return np.log(np.exp(_sc(raw)) + 0.01)
    if spec == "explin":
        return np.where(raw <= 0, raw, np.log1p(np.maximum(raw, 0)))
    if spec == "upbounded(1)":
        sigma = np.where(raw <= 0, 0.5 * np.exp(np.minimum(raw, 0)), 0.5 * (2 - np.exp(-np.maximum(raw, 0))))
        return np.log(sigma)
    if spec == "constant(1)":
        return np.zeros_like(raw)
    if spec.startswith("bounded("):
        alpha, omega = (float(v) for v in spec[len("bounded("):-1].split(","))
        return np.log(alpha + (omega - alpha) / (1 + np.exp(-raw)))
    raise AssertionError(spec)


def _np_kl(m1, l1, m2, l2):
    s1, s2 = np.exp(l1), np.exp(l2)
    return np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


def _np_log_pdf(x, m, l):
    return -0.5 * ((x - m) / np.exp(l)) ** 2 - l - 0.5 * LOG_2PI


def _np(t):
    return t.detach().double().numpy()


@contextlib.contextmanager
def _captured(model):
    """Raw head outputs, each group's z (pre- and post-flow) and flow log-dets, for one forward."""
    rec = {"enc": [], "dec": [], "z": [], "z0": [], "log_det": []}
    hooks = [h.register_forward_hook(lambda m, i, o: rec["enc"].append([_np(t) for t in o.chunk(2, 1)]))
             for h in model.enc_sampler]
    hooks += [h.register_forward_hook(lambda m, i, o: rec["dec"].append([_np(t) for t in o.chunk(2, 1)]))
              for h in model.dec_sampler]
    hooks += [c.register_forward_pre_hook(lambda m, i: rec["z"].append(_np(i[1])))
              for c in model.dec_tower if c.cell_type == "combiner_dec"]
    per_group = model.num_flows
    for k, cell in enumerate(model.nf_cells):
        if k % per_group == 0:
            hooks.append(cell.register_forward_pre_hook(lambda m, i: rec["z0"].append(_np(i[0]))))
        hooks.append(cell.register_forward_hook(lambda m, i, o, first=(k % per_group == 0):
                                                rec["log_det"].append(_np(o[1])) if first else
                                                rec["log_det"].__setitem__(-1, rec["log_det"][-1] + _np(o[1]))))
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()


def _reference(rec, post, prior, res_dist, vanilla=False):
    """Per-group KL (B,), total log q and log p (B,), in float64, from the captured raws."""
    kls, log_q, log_p = [], 0.0, 0.0
    flows = bool(rec["z0"])
    for i, (mq_raw, rq) in enumerate(rec["enc"]):
        z = rec["z"][i]
        z0 = rec["z0"][i] if flows else z
        if i == 0:
            mp_raw, rp = None, None
            mp, lp = 0.0, (math.log(1.01) if vanilla else 0.0)  # the fixed top prior
        else:
            mp_raw, rp = rec["dec"][i - 1]
            mp, lp = _sc(mp_raw), _np_log_sigma(prior, rp)
        if res_dist and i > 0:
            mq = _sc(mp_raw + mq_raw)
            # vanilla soft-clamps the sum of raws; the patch adds the two exact log sigmas
            lq = _np_log_sigma("softclamp", rp + rq) if vanilla else lp + _np_log_sigma(post, rq)
        else:
            mq, lq = _sc(mq_raw), _np_log_sigma(post, rq)
        lq_i = _np_log_pdf(z0, mq, lq) - (rec["log_det"][i] if flows else 0.0)
        lp_i = _np_log_pdf(z, mp, lp)
        kl = lq_i - lp_i if flows else _np_kl(mq, lq, mp, lp)
        kls.append(kl.sum(axis=(1, 2, 3)))
        log_q = log_q + lq_i.sum(axis=(1, 2, 3))
        log_p = log_p + lp_i.sum(axis=(1, 2, 3))
    return kls, log_q, log_p


def _sides(variant):
    if variant.is_vanilla:
        return "softclamp", "softclamp"
    return (variant.posterior.spec if variant.posterior else "softclamp",
            variant.prior.spec if variant.prior else "softclamp")


def _widen_heads(model, factor=3.0):
    """Scale the heads' weight norms so raw outputs reach both branches and the +-5 clamp."""
    with torch.no_grad():
        for head in model.enc_sampler:
            head.log_weight_norm.add_(math.log(factor))
        for head in model.dec_sampler:
            head[1].log_weight_norm.add_(math.log(factor))


def _check_against_reference(model, variant, seed=0):
    variant = vaepatch.Variant.parse(variant)
    x = cifar_like(2, seed=seed)
    with _captured(model) as rec:
        torch.manual_seed(seed)
        _, log_q, log_p, kl_all, _ = model(x)
    post, prior = _sides(variant)
    kls, ref_q, ref_p = _reference(rec, post, prior, model.res_dist, vanilla=variant.is_vanilla)
    assert len(kl_all) == len(kls) == 4
    for got, ref in zip(kl_all, kls):
        np.testing.assert_allclose(_np(got), ref, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(_np(log_q), ref_q, rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(_np(log_p), ref_p, rtol=1e-5, atol=2e-3)
    return rec


@contextlib.contextmanager
def _spy(cls, name):
    """Record (self, args) of every call of cls.name (whatever it currently is); restore exactly."""
    calls, inner = [], cls.__dict__[name]

    def spy(self, *args, **kwargs):
        calls.append((self, args))
        return inner(self, *args, **kwargs)

    setattr(cls, name, spy)
    try:
        yield calls
    finally:
        setattr(cls, name, inner)


@pytest.fixture(scope="module")
def plain_model(nvae):
    model = tiny_model(seed=0)
    _widen_heads(model)
    return model


@pytest.fixture(scope="module")
def res_model(nvae):
    model = tiny_model(seed=1, res_dist=True)
    _widen_heads(model)
    return model


def _originals(nvae):
    d, m = nvae["distributions"], nvae["model"]
    return {"Normal.__init__": d.Normal.__dict__["__init__"], "Normal.log_p": d.Normal.__dict__["log_p"],
            "Normal.kl": d.Normal.__dict__["kl"], "Normal.sample": d.Normal.__dict__["sample"],
            "NormalDecoder.__init__": d.NormalDecoder.__dict__["__init__"],
            "AutoEncoder.forward": m.AutoEncoder.__dict__["forward"], "AutoEncoder.sample": m.AutoEncoder.__dict__["sample"],
            "DiscMixLogistic": dict(vars(d.DiscMixLogistic)), "DiscLogistic": dict(vars(d.DiscLogistic)),
            "model.Normal": m.Normal}


def _loss(model, seed=3):
    """NVAE's training loss pieces for one seeded step: recon + KL (as train.py sums them)."""
    import utils

    torch.manual_seed(seed)
    x = cifar_like(2, seed=seed)
    logits, log_q, log_p, kl_all, _ = model(x)
    recon = utils.reconstruction_loss(model.decoder_output(logits), x, crop=model.crop_output)
    return torch.mean(recon + torch.stack(kl_all, dim=1).sum(dim=1))


# ----------------------------------------------------------------- the tests

@pytest.mark.parametrize("name", TABLE4 + ["posterior=explin,prior=upbounded(1)", "qfloor-cst1", "qfloor-floor"])
def test_kl_log_q_log_p_match_float64_reference(plain_model, name):
    vaepatch.apply(name, target="nvae")
    rec = _check_against_reference(plain_model, name)
    raw = np.concatenate([r[1].ravel() for r in rec["enc"] + rec["dec"]])
    assert raw.min() < -1 and raw.max() > 1  # both branches of the piecewise forms are exercised


@pytest.mark.parametrize("name", ["vanilla", "upbounded1", "explin-cst1", "vanilla-cst1"])
def test_residual_posterior_combines_in_log_sigma_space(res_model, nvae, name):
    """--res_dist: q = N(mu_p + mu_q, sigma_p * dsigma), log sigma_q = log sigma_p + log dsigma."""
    vaepatch.apply(name, target="nvae")
    with _spy(nvae["distributions"].Normal, "kl") as pairs:
        rec = _check_against_reference(res_model, name)
    if vaepatch.Variant.parse(name).is_vanilla:
        return
    post, prior = _sides(vaepatch.Variant.parse(name))
    for (q, (p,)), i in zip(pairs[1:], range(1, 4)):
        dsigma_log = _np_log_sigma(post, rec["enc"][i][1])
        np.testing.assert_allclose(_np(q.log_sigma - p.log_sigma), dsigma_log, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_np(q.sigma), np.exp(_np_log_sigma(prior, rec["dec"][i - 1][1]) + dsigma_log),
                                   rtol=1e-5)
        if prior == "constant(1)":  # a constant prior scale leaves q's scale to the posterior head alone
            assert torch.equal(p.log_sigma, torch.zeros_like(p.log_sigma))


def test_flow_path_uses_the_stable_log_p(nvae):
    """num_nf > 0: the KL is log q(z0) - log|det| - log p(z), through the patched log_p."""
    model = tiny_model(seed=2, num_nf=1)
    _widen_heads(model)
    for name in ("vanilla", "upbounded1-cst1"):
        vaepatch.apply(name, target="nvae")
        rec = _check_against_reference(model, name)
        assert len(rec["z0"]) == 4 and len(rec["log_det"]) == 4


@pytest.mark.parametrize("name", TABLE4)
def test_top_prior_is_exactly_standard_normal(plain_model, nvae, name):
    vaepatch.apply(name, target="nvae")
    with _spy(nvae["distributions"].Normal, "kl") as pairs:
        torch.manual_seed(0)
        plain_model(cifar_like(2))
    top = pairs[0][1][0]  # q_0.kl(p_0): p_0 = Normal(0, log_sigma=0)
    assert torch.equal(top.mu, torch.zeros_like(top.mu))
    if name == "vanilla":  # upstream: exp(0) + 0.01
        assert torch.allclose(top.sigma, torch.full_like(top.sigma, 1.01))
    else:
        assert torch.equal(top.sigma, torch.ones_like(top.sigma))
        assert torch.equal(top.log_sigma, torch.zeros_like(top.log_sigma))


def test_temperature_multiplies_sigma(plain_model, nvae):
    Normal = nvae["distributions"].Normal
    for name in ("upbounded1", "explin-cst1"):
        vaepatch.apply(name, target="nvae")
        _, prior = _sides(vaepatch.Variant.parse(name))
        for t in (1.0, 0.6):
            raws = []
            hooks = [h.register_forward_hook(lambda m, i, o: raws.append(_np(o.chunk(2, 1)[1])))
                     for h in plain_model.dec_sampler]
            try:
                with _spy(Normal, "sample") as drawn, torch.no_grad():
                    logits = plain_model.sample(2, t)
            finally:
                for h in hooks:
                    h.remove()
            assert logits.shape == (2, 6, 32, 32) and torch.isfinite(logits).all()
            top, priors = drawn[0][0], [d[0] for d in drawn[1:]]
            assert torch.equal(top.sigma, torch.full_like(top.sigma, t))  # N(0, t) exactly
            np.testing.assert_allclose(_np(top.log_sigma), math.log(t), atol=1e-7)
            assert len(priors) == len(raws) == 3
            for dist, raw in zip(priors, raws):
                np.testing.assert_allclose(_np(dist.sigma), t * np.exp(_np_log_sigma(prior, raw)), rtol=1e-5)
                np.testing.assert_allclose(_np(dist.log_sigma), math.log(t) + _np_log_sigma(prior, raw),
                                           rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        plain_model.sample(1, -0.5)


@pytest.mark.parametrize("name,decoder", [("upbounded1", "softclamp"),
                                          ("upbounded1,decoder=bounded(0.01, 2)", "bounded(0.01, 2)")])
def test_normal_decoder_uses_the_decoder_scale(nvae, name, decoder):
    distributions = nvae["distributions"]
    vaepatch.apply(name, target="nvae")
    g = torch.Generator().manual_seed(0)
    param = 4 * torch.randn(2, 6, 8, 8, generator=g)
    x = cifar_like(2)[:, :, :8, :8]
    out = distributions.NormalDecoder(param)
    mu_raw, raw = _np(param[:, :3]), _np(param[:, 3:])
    ref_log_sigma = _np_log_sigma(decoder, raw)
    np.testing.assert_allclose(_np(out.dist.log_sigma), ref_log_sigma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(out.dist.sigma), np.exp(ref_log_sigma), rtol=1e-5)
    np.testing.assert_allclose(_np(out.log_prob(x)), _np_log_pdf(2 * _np(x) - 1, _sc(mu_raw), ref_log_sigma),
                               rtol=1e-5, atol=1e-4)
    if decoder == "softclamp":  # a decoder left to upstream: NVAE's own sigma, bit for bit
        vaepatch.revert("nvae")
        assert torch.equal(distributions.NormalDecoder(param).dist.sigma, out.dist.sigma)


def test_discretized_logistic_decoders_are_left_alone(nvae):
    before = _originals(nvae)
    vaepatch.apply("upbounded1", target="nvae")
    after = _originals(nvae)
    assert after["DiscMixLogistic"] == before["DiscMixLogistic"] and after["DiscLogistic"] == before["DiscLogistic"]
    assert after["Normal.sample"] is before["Normal.sample"] and after["model.Normal"] is before["model.Normal"]


def test_revert_restores_identity_and_loss_bit_for_bit(plain_model, nvae):
    before, vanilla = _originals(nvae), _loss(plain_model).item()
    vaepatch.apply("upbounded1", target="nvae")
    now = _originals(nvae)
    replaced = ["Normal.__init__", "Normal.log_p", "Normal.kl", "NormalDecoder.__init__",
                "AutoEncoder.forward", "AutoEncoder.sample"]
    assert all(now[k] is not before[k] for k in replaced)
    assert _loss(plain_model).item() != vanilla
    vaepatch.revert()
    after = _originals(nvae)
    assert all(after[k] is before[k] for k in replaced)
    assert _loss(plain_model).item() == vanilla
    assert all(not head._forward_hooks for head in list(plain_model.enc_sampler) + list(plain_model.dec_sampler))


def test_vanilla_patches_nothing(plain_model, nvae):
    before, plain = _originals(nvae), _loss(plain_model).item()
    handle = vaepatch.apply("vanilla", target="nvae")
    assert handle.patchset.patches == []
    assert all(_originals(nvae)[k] is before[k] for k in before if not isinstance(before[k], dict))
    assert _loss(plain_model).item() == plain


def test_apply_twice_is_noop_and_swap_is_clean(plain_model, nvae):
    before = _originals(nvae)
    first = vaepatch.apply("explin", target="nvae")
    init = _originals(nvae)["Normal.__init__"]
    assert vaepatch.apply("explin", target="nvae") is first
    assert _originals(nvae)["Normal.__init__"] is init
    second = vaepatch.apply("upbounded1", target="nvae")
    assert not first.patchset.applied and second.patchset.applied
    assert vaepatch.active()["nvae"].name == "upbounded1"
    swapped = _loss(plain_model).item()
    vaepatch.revert()
    assert all(_originals(nvae)[k] is before[k] for k in before if not isinstance(before[k], dict))
    with vaepatch.patched("upbounded1", target="nvae"):
        assert _loss(plain_model).item() == swapped
    assert all(_originals(nvae)[k] is before[k] for k in before if not isinstance(before[k], dict))


def test_fingerprints_match_the_pinned_clone(nvae):
    from vaepatch.targets.nvae import patch as target

    # OU adds Normal.sample; a constant prior adds the weight normalization, in neural_operations and where
    # neural_ar_operations imported it by value (fingerprinted where it is defined)
    patches = target.build(vaepatch.Variant.parse("upbounded1-cst1,ou=0.9x5"), nvae)
    assert PatchSet(patches).check() == []
    by_value = [p for p in patches if getattr(p.owner, "__name__", "") == "neural_ar_operations"]
    assert len(patches) == 9 and len(by_value) == 1 and all(p.fingerprint for p in patches if p not in by_value)

    def owner(p):
        return p.owner.__name__ if isinstance(p.owner, type(sys)) else f"{p.owner.__module__}.{p.owner.__qualname__}"

    assert set(target.FINGERPRINTS) == {(owner(p), p.attribute) for p in patches if p not in by_value}
    assert len(target.build(vaepatch.Variant.parse("upbounded1"), nvae)) == 6  # no constant side: NVAE's norm as is


def test_a_constant_prior_keeps_nvaes_weight_norm_finite_at_a_zero_filter(nvae):
    """Under a constant prior the prior heads' scale filters get no gradient from the loss, only NVAE's
    weight decay, until their squares underflow; NVAE's sqrt(sum w^2) then has a NaN gradient."""
    operations = sys.modules["neural_operations"]
    conv = operations.Conv2D(3, 4, kernel_size=1, weight_norm=True)
    with torch.no_grad():
        conv.weight[1].fill_(1e-24)  # its square underflows: the norm is 0
    x = torch.randn(2, 3, 5, 5)

    def grads():
        conv.zero_grad()
        (conv(x)[:, [0, 2, 3]] ** 2).sum().backward()  # filter 1 feeds nothing: no gradient from the loss
        return conv.weight.grad

    assert torch.isnan(grads()[1]).all()  # NVAE's own
    vaepatch.apply("qfloor-cst1", target="nvae")
    g = grads()
    assert torch.isfinite(g).all() and (g[1] == 0).all() and g[0].abs().sum() > 0
    vaepatch.revert("nvae")
    assert torch.isnan(grads()[1]).all()  # restored
    vaepatch.apply("upbounded1", target="nvae")  # no constant side: NVAE's weight norm is left alone
    assert torch.isnan(grads()[1]).all()


def test_finite_loss_and_gradients(nvae):
    model = tiny_model(seed=4, res_dist=True, num_nf=1)
    vaepatch.apply("upbounded1-cst1", target="nvae")
    model.zero_grad()
    loss = _loss(model) + model.spectral_norm_parallel() + model.batchnorm_loss()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    heads = [p.grad for h in list(model.enc_sampler) + list(model.dec_sampler) for p in h.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in heads)


def test_ou_patches_the_draw_too_and_rho_one_is_plain(nvae):
    handle = vaepatch.apply("upbounded1,ou=0.9x5", target="nvae")
    assert [p.attribute for p in handle.patchset.patches].count("sample") == 2  # Normal's and AutoEncoder's
    handle = vaepatch.apply("upbounded1,ou=1x5", target="nvae")
    assert len(handle.patchset.patches) == 6


def test_clear_errors(tmp_path):
    from vaepatch.upstream import UpstreamError

    with pytest.raises(UpstreamError, match="vaepatch fetch"):
        vaepatch.apply("upbounded1", target="nvae", upstream=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="supported: vdvae, nvae"):
        vaepatch.apply("upbounded1", target="nope")


def test_missing_import_says_which_shims_to_install():
    """A fresh interpreter without tensorboardX: apply(target="nvae") names the compat shims."""
    if runs_shims.importable("tensorboardX"):
        pytest.skip("tensorboardX is installed here, so NVAE imports without the shims")
    code = ("import vaepatch\n"
            "try:\n    vaepatch.apply('upbounded1', target='nvae')\n"
            "except vaepatch.upstream.UpstreamError as e:\n    print(e)\n")
    env = {**os.environ, "VAEPATCH_NVAE": str(CLONE)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "No module named 'tensorboardX'" in out.stdout and "vaepatch.targets.nvae.shims.install" in out.stdout, out.stdout + out.stderr


# ----------------------------------------------------------------- the NVAE compat shims

def _shim(name):
    return next(s for s in nvae_shims.SHIMS if s.name == name)


def test_shims_are_on_only_when_needed(nvae):
    gpu = {s.name for s in runs_shims.needed(False, nvae_shims.SHIMS)}
    assert not any(n.startswith("cpu-") for n in gpu)
    for name, module in (("tensorboardx-stub", "tensorboardX"), ("lmdb-stub", "lmdb"), ("torchvision-stub-nvae", "torchvision")):
        assert (name in gpu) == (not runs_shims.importable(module))
    assert all(s.fixes for s in nvae_shims.SHIMS)
    assert nvae["shims"].names == [s.name for s in runs_shims.needed(True, nvae_shims.SHIMS)]


def test_train_py_imports_under_the_shims_and_missing_packages_say_so(nvae):
    """train.py's whole import chain (datasets, lmdb, lsun, fid) loads; using a stand-in raises."""
    if runs_shims.importable("torchvision") or runs_shims.importable("lmdb"):
        pytest.skip("torchvision and lmdb are installed here: their stand-ins are not in use")
    import datasets
    import lmdb
    import train  # imports model, datasets, fid.fid_score, fid.inception
    from torchvision.datasets.vision import VisionDataset

    assert callable(train.main) and callable(train.init_processes)
    assert issubclass(datasets.StackedMNIST, sys.modules["torchvision.datasets"].MNIST)
    assert issubclass(sys.modules["thirdparty.lsun"].LSUNClass, VisionDataset)
    with pytest.raises(runs_shims.CompatError, match="torchvision.datasets.MNIST was used.*torchvision"):
        datasets.dset.MNIST(root="x", train=True, download=True)
    with pytest.raises(FileNotFoundError, match="vaepatch make-data"):  # CIFAR10 works, and never downloads
        datasets.dset.CIFAR10(root="x", train=True, download=True)
    with pytest.raises(runs_shims.CompatError, match="pip install lmdb"):
        lmdb.open("x")


def test_tensorboardx_stand_in_writes_nothing(nvae, tmp_path, monkeypatch):
    """NVAE's own Writer, called as train.py calls it, over the stand-in: no log folder, no event file, anywhere
    (tensorboardX's real SummaryWriter makes its log_dir and an events.out.tfevents file as it starts)."""
    if runs_shims.importable("tensorboardX"):
        pytest.skip("tensorboardX is installed here: its stand-in is not in use")
    import utils

    cwd, save = tmp_path / "cwd", tmp_path / "eval-run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a relative path written by the stand-in would land here
    writer = utils.Writer(0, str(save))  # rank 0: the one that writes, SummaryWriter(log_dir=save, flush_secs=20)
    assert getattr(sys.modules["tensorboardX"], "__vaepatch_stand_in__", False)
    assert type(writer.writer).__module__ == "tensorboardX"
    assert writer.add_scalar("train/nelbo", 1.0, 0) is None
    writer.add_image("reconstruction", torch.zeros(3, 4, 4), 0)
    writer.add_histogram("weights", torch.zeros(5), 0)
    writer.add_figure("figure", None, 0)
    writer.writer.flush()
    writer.close()
    assert not save.exists()
    assert [p for p in tmp_path.rglob("*") if p != cwd] == []


def test_count_parameters_works_on_todays_numpy(nvae):
    import utils

    model = tiny_model(seed=6)
    expected = sum(p.numel() for p in model.parameters()) / 1e6
    assert utils.count_parameters_in_M(model) == pytest.approx(expected)
    assert ("numpy-sum-generator" in nvae["shims"].names) == nvae_shims._sum_rejects_generators()
    assert utils.np.asarray is np.asarray


def test_cpu_batch_norms_match_torch_and_are_restored(nvae):
    import neural_operations
    from thirdparty.inplaced_sync_batchnorm import SyncBatchNormSwish

    torch.manual_seed(0)
    x = 3 * torch.randn(4, 5, 6, 6) + 1
    swish_bn = SyncBatchNormSwish(5, momentum=0.05)
    reference = torch.nn.BatchNorm2d(5, momentum=0.05)
    out = swish_bn(x)
    torch.testing.assert_close(out, torch.nn.functional.silu(reference(x)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(swish_bn.running_var, reference.running_var)
    wrapped = neural_operations.SyncBatchNorm(5, momentum=0.05)
    torch.testing.assert_close(wrapped(x), torch.nn.BatchNorm2d(5, momentum=0.05)(x))

    forwards = (SyncBatchNormSwish.__dict__["forward"], neural_operations.SyncBatchNorm.__dict__["forward"])
    nvae["shims"].revert()
    try:
        restored = (SyncBatchNormSwish.__dict__["forward"], neural_operations.SyncBatchNorm.__dict__["forward"])
        assert restored[0] is not forwards[0] and restored[1] is not forwards[1]
        assert [f.__module__ for f in restored] == ["thirdparty.inplaced_sync_batchnorm", "neural_operations"]
        assert "cuda" not in vars(torch.Tensor) and torch.nn.Module.cuda.__module__ == "torch.nn.modules.module"
        with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
            swish_bn(x)  # upstream's own line, which the shim exists for
        assert "tensorboardX" not in sys.modules or runs_shims.importable("tensorboardX")
        assert sys.modules["utils"].np is np
    finally:
        nvae["shims"] = shims = runs_shims.install(runs_shims.needed(True, nvae_shims.SHIMS))
    assert shims.names and SyncBatchNormSwish.__dict__["forward"] is not forwards[0]
    torch.testing.assert_close(swish_bn(x), out)


def test_cpu_batch_norm_syncs_over_gloo_processes(tmp_path):
    """Two gloo processes with half a batch each = one process with the whole batch (as SyncBatchNorm)."""
    import torch.multiprocessing as mp

    from tests.nvae_support import sync_bn_case, sync_bn_worker

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=sync_bn_worker, args=(rank, 2, str(tmp_path / "store"), queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    finally:
        for p in procs:
            p.join(timeout=30)
    out, x_grad, w_grad, b_grad, mean, var = (
        [torch.from_numpy(r[k]) for r in results] for k in range(1, 7))
    x, w, bn = sync_bn_case()
    x.requires_grad_()
    expected = bn(x)
    (expected * w).sum().backward()
    torch.testing.assert_close(torch.cat(out), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(x_grad), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_grad[0] + w_grad[1], bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b_grad[0] + b_grad[1], bn.bias.grad, rtol=1e-4, atol=1e-4)
    for rank in range(2):
        torch.testing.assert_close(mean[rank], bn.running_mean)
        torch.testing.assert_close(var[rank], bn.running_var)


def test_decoder_scale_on_logistic_pixels_warns(nvae):
    model = tiny_model(seed=5, num_mixture_dec=10)
    vaepatch.apply("upbounded1,decoder=bounded(0.01, 2)", target="nvae")
    with pytest.warns(UserWarning, match="decoder scale is unused"):
        logits = model(cifar_like(2))[0]
    assert type(model.decoder_output(logits)).__name__ == "DiscMixLogistic"


def test_cifar10_stand_in_feeds_nvae_loader_the_images_unchanged(nvae, tmp_path):
    """NVAE's own cifar10 pipeline (CIFAR10 + RandomHorizontalFlip + ToTensor) on make-data's files."""
    if runs_shims.importable("torchvision"):
        pytest.skip("torchvision is installed here: its stand-in is not in use")
    import argparse

    import datasets
    from vaepatch import cifar_format

    cifar_format.make(tmp_path, n_train=10, n_test=3, for_target="nvae")
    train_images, _ = cifar_format.read(tmp_path, train=True)
    args = argparse.Namespace(dataset="cifar10", data=str(tmp_path), batch_size=10, distributed=False)
    train_queue, valid_queue, _ = datasets.get_loaders(args)
    (valid_batch, labels), = list(valid_queue)
    test_images, _ = cifar_format.read(tmp_path, train=False)
    assert valid_batch.shape == (3, 3, 32, 32) and labels.tolist() == [0, 0, 0]
    test_expected = torch.from_numpy(test_images).permute(0, 3, 1, 2).float() / 255
    assert sorted(i for image in valid_batch for i in range(3) if torch.equal(image, test_expected[i])) == [0, 1, 2]
    torch.manual_seed(0)
    (batch, _), = list(train_queue)  # shuffled and randomly flipped: each image is one of the two
    expected = torch.from_numpy(train_images).permute(0, 3, 1, 2).float() / 255
    matched = set()
    for image in batch:
        hits = [i for i in range(10) if torch.equal(image, expected[i]) or torch.equal(image, expected[i].flip(-1))]
        assert len(hits) >= 1
        matched.update(hits)
    assert len(matched) == 10
    flipped = sum(any(torch.equal(image, expected[i].flip(-1)) and not torch.equal(image, expected[i])
                      for i in range(10)) for image in batch)
    assert 0 < flipped < 10  # p = 0.5 flips: some, not all (fails with probability 2 / 2**10)


@pytest.mark.parametrize("name,flows", [("upbounded1", False), ("upbounded1", True), ("qfloor-cst1", False)])
def test_fused_matches_eager_loss_and_gradients(nvae, name, flows):
    """fuse=True (each head's mapping, the KL and log density compiled) keeps the eager numbers, on a
    model with widened heads (raws in both branches and at the clamp): without flows (the KL through
    Normal.kl) and with a flow and the residual posterior (the KL as log q - log p, through log_p)."""
    import warnings

    model = tiny_model(seed=5, res_dist=flows, num_nf=int(flows))
    _widen_heads(model)
    results = {}
    for fuse in (False, True):
        vaepatch.apply(name, target="nvae", fuse=fuse)
        model.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = _loss(model)
            loss.backward()
        assert not [w for w in caught if "torch.compile" in str(w.message)]  # compiled, not fallen back to eager
        results[fuse] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        vaepatch.revert()
    (loss_e, grads_e), (loss_f, grads_f) = results[False], results[True]
    assert torch.isfinite(loss_f) and len(grads_f) == len(grads_e) > 0
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-4)
    # Some gradients are exactly zero in exact arithmetic (a conv bias before a batch norm) and come out
    # as float32 rounding of the model's large gradients (~1e3 here): measured against those.
    scale = max(g.abs().max().item() for g in grads_e)
    for gf, ge in zip(grads_f, grads_e):
        torch.testing.assert_close(gf, ge, rtol=1e-4, atol=1e-8 * scale)


# ----------------------------------------------------------------- AMP's skip rule on the CPU

def test_on_cpu_nvae_train_py_skips_a_step_with_nan_gradients_as_amp_does(nvae):
    """NVAE's train.py builds ``GradScaler(2**10)`` from torch.cuda.amp, which disables itself without CUDA:
    a NaN step would then be applied and the weights go NaN. The CPU shim gives it torch.amp's CPU scaler,
    which skips that step and halves its scale, as AMP does on a GPU; a finite step is still applied."""
    from torch.cuda.amp import grad_scaler

    from vaepatch.runs.script import load_script

    train, _ = load_script(CLONE / "train.py")

    def step(scaler, model, factor):
        optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
        _, _, _, kl_all, _ = model(cifar_like())
        loss = sum(kl.mean() for kl in kl_all) * factor
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = train.GradScaler(2 ** 10)  # as NVAE's main() builds it
    step(scaler, model, float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and scaler.get_scale() == 512
    model.zero_grad()
    step(scaler, model, 1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.warns(UserWarning):  # upstream's own scaler on the CPU: disabled, the NaN step applied
        plain = grad_scaler.GradScaler(2 ** 10)
    model = tiny_model()
    step(plain, model, float("nan"))
    assert not all(torch.isfinite(p).all() for p in model.parameters())
