"""`vaepatch bench decoder-variance`: loader, bits/dim, training determinism, NaN detection, CLI."""
from __future__ import annotations

import gzip
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vaepatch import gaussian, mnist, scales
from vaepatch.bench.reparam import decoder_variance as dv
from vaepatch.bench import paper_tables

REPO = Path(__file__).resolve().parents[1]
REAL_MNIST = Path(os.environ.get(dv.ENV) or REPO.parent / "shared" / "data" / "mnist_test10k.npz")
needs_mnist = pytest.mark.skipif(not REAL_MNIST.is_file(),
                                 reason=f"real MNIST file {REAL_MNIST} absent (set ${dv.ENV})")


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _idx_bytes(images):
    n, rows, cols = images.shape
    return struct.pack(">IIII", mnist.IDX_MAGIC, n, rows, cols) + images.tobytes()


# ---------------------------------------------------------------- loader

def test_load_npz(tmp_path):
    images = _images(7)
    np.savez(tmp_path / "m.npz", data=images)
    got = dv.load_mnist(tmp_path / "m.npz")
    assert got.shape == (7, 28, 28) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx(tmp_path, gz):
    images = _images(5, seed=1)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(_idx_bytes(images)) if gz else _idx_bytes(images))
    got = dv.load_mnist(path)
    assert got.shape == (5, 28, 28) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="yann.lecun.com"):
        dv.load_mnist(tmp_path / "nope.npz")
    np.savez(tmp_path / "key.npz", images=_images(2))
    with pytest.raises(ValueError, match="no array named 'data'"):
        dv.load_mnist(tmp_path / "key.npz")
    np.savez(tmp_path / "shape.npz", data=np.zeros((3, 28, 27), np.uint8))
    with pytest.raises(ValueError, match=r"N x 28 x 28 uint8.*\(3, 28, 27\)"):
        dv.load_mnist(tmp_path / "shape.npz")
    np.savez(tmp_path / "dtype.npz", data=np.zeros((3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="float32"):
        dv.load_mnist(tmp_path / "dtype.npz")
    (tmp_path / "short-idx3-ubyte").write_bytes(_idx_bytes(_images(4))[:-10])
    with pytest.raises(ValueError, match="IDX header says 4 x 28 x 28"):
        dv.load_mnist(tmp_path / "short-idx3-ubyte")
    (tmp_path / "junk.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="unreadable"):
        dv.load_mnist(tmp_path / "junk.gz")
    (tmp_path / "text.txt").write_text("hello, not MNIST at all")
    with pytest.raises(ValueError, match="neither an .npz nor an IDX"):
        dv.load_mnist(tmp_path / "text.txt")


def test_resolve_data(monkeypatch, tmp_path):
    monkeypatch.delenv(dv.ENV, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        dv.resolve_data(None)
    assert "--data" in str(e.value) and dv.ENV in str(e.value) and "yann.lecun.com" in str(e.value)
    monkeypatch.setenv(dv.ENV, "/from/env")
    assert dv.resolve_data(None) == "/from/env"
    assert dv.resolve_data("/from/flag") == "/from/flag"


def test_main_errors_without_data(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(dv.ENV, raising=False)
    assert dv.main(["--quick", "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    assert dv.main(["--quick", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        dv.main(["--quick", "--mu", "tanh", "--data", "x"])


def test_split_is_fixed_and_disjoint():
    ids = np.arange(10000)
    images = np.zeros((10000, 28, 28), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256  # each image carries its index
    parts = dv.split(images)
    assert [len(p) for p in parts] == [8000, 1000, 1000]
    tag = lambda a: set(a[:, 0, 0].astype(int) * 256 + a[:, 0, 1])
    train, val, test = map(tag, parts)
    assert not (train & val or train & test or val & test) and len(train | val | test) == 10000
    assert tag(dv.split(images)[2]) == test and tag(dv.split(images)[1]) == val  # fixed
    assert test != set(range(9000, 10000))  # shuffled, not the tail
    with pytest.raises(ValueError, match="at least 3 images"):
        dv.split(images[:2])


def test_split_spec_list():
    from vaepatch.variant import split_list

    assert split_list("naive_exp,bounded(1/(256*sqrt(12)), 1),exp") == ["naive_exp", "bounded(1/(256*sqrt(12)), 1)", "exp"]
    assert split_list("exp; bounded(0.1, 1)") == ["exp", "bounded(0.1, 1)"]
    assert split_list("upbounded1;posterior=explin,prior=cst1;") == ["upbounded1", "posterior=explin,prior=cst1"]


# ---------------------------------------------------------------- bits/dim

def test_uniform_density_is_8_bits():
    assert dv.bits_per_dim(0.0) == 8.0  # log p = 0 for U[0, 1]^784
    assert dv.bits_per_dim(0.0, dims=3) == 8.0
    assert dv.bits_per_dim(784 * math.log(2)) == 9.0  # one more bit per pixel


def test_gaussian_bits_per_dim_vs_float64():
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (4, dv.PIXELS), generator=g).float()
    x = dv.dequantize(levels, g)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(torch.floor(x * 256), levels)  # each x stays in its own 8-bit bin
    loc = torch.rand(4, dv.PIXELS, generator=g)
    log_scale = torch.empty(4, dv.PIXELS).uniform_(-5, 0, generator=g)
    nll = -gaussian.log_prob(x, loc, log_scale).sum(1)
    ours = [dv.bits_per_dim(float(v)) for v in nll]
    xd, md, ld = (t.double().numpy() for t in (x, loc, log_scale))
    ref = (0.5 * ((xd - md) / np.exp(ld)) ** 2 + ld + 0.5 * np.log(2 * np.pi)).sum(1) / (dv.PIXELS * np.log(2)) + 8
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_bits_per_dim_bounds_the_discrete_codelength():
    """For a smooth density, E_u[-log2 p((k+u)/256)] + 8 is close to (and above) -log2 P(bin k)."""
    mu, sigma = 0.4, 0.2
    u = (np.arange(2000) + 0.5) / 2000
    for k in (0, 60, 102, 200, 255):
        x = (k + u) / 256
        nll = (0.5 * ((x - mu) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)).mean()
        bpd = dv.bits_per_dim(nll, dims=1)
        cdf = lambda t: 0.5 * (1 + math.erf((t - mu) / (sigma * math.sqrt(2))))
        exact = -math.log2(cdf((k + 1) / 256) - cdf(k / 256))
        assert exact <= bpd + 1e-12 and bpd - exact < 1e-3


# ---------------------------------------------------------------- training

def _tiny_data(n=300, seed=0):
    images = _images(n, seed)
    images[:, :, :6] = 0  # some flat background, as in MNIST
    return [dv._levels(p) for p in dv.split(images)]


def test_one_epoch_is_deterministic_per_seed():
    data = _tiny_data()
    cfg = dv.RunConfig("sigmoid", "bounded(1/(256*sqrt(12)), 1)", 1e-3, seed=3, epochs=1, batch_size=64)
    runs, states = [], []
    for c in (cfg, cfg, dv.RunConfig(**{**cfg.__dict__, "seed": 4})):
        torch.manual_seed(c.seed)
        model = dv.VAE(c.mu, c.scale)
        runs.append(dv.train_run(c, *data, model=model))
        states.append(model.state_dict())
    a, b, other = runs
    assert not a["failed"] and a["epochs_trained"] == 1 and math.isfinite(a["test_bpd"]) and a["best_epoch"] == 1
    assert a["train_bpd"] == b["train_bpd"] and a["test_bpd"] == b["test_bpd"] and a["val_bpd"] == b["val_bpd"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert other["train_bpd"] != a["train_bpd"]
    assert not torch.equal(states[0]["decoder.2.weight"], states[2]["decoder.2.weight"])
    assert a["test_bpd"] == pytest.approx(dv.bits_per_dim(a["test_nelbo"]))


class _Spy(dv.VAE):
    """Records every input the training steps see (evaluation runs without gradients)."""

    def forward(self, x, eps=None):
        if torch.is_grad_enabled():
            self.seen.append(x.detach().clone())
        return super().forward(x, eps)


@pytest.mark.parametrize("noise", [False, True])
def test_training_sees_the_levels_as_given_unless_asked_for_noise(noise):
    train, val, test = _tiny_data()
    cfg = dv.RunConfig("sigmoid", "exp", 1e-3, seed=0, epochs=1, batch_size=64, train_noise=noise)
    torch.manual_seed(0)
    spy = _Spy(cfg.mu, cfg.scale)
    spy.seen = []
    dv.train_run(cfg, train, val, test, model=spy)
    seen = torch.cat(spy.seen)
    assert seen.shape == train.shape
    k = torch.floor(seen * 256)
    # every row is one training image's levels, in the bin [k, k + 1) / 256 ...
    assert sorted(map(tuple, k.tolist())) == sorted(map(tuple, train.tolist()))
    # ... exactly at its left edge without noise (the paper's protocol), inside the bin with it
    assert torch.equal(seen * 256 == k, torch.ones_like(seen, dtype=torch.bool)) != noise


def test_without_noise_constant_pixels_let_gamma_run_off_and_with_noise_they_do_not():
    """The mechanism of the paper's Table 3: the flat background has no spread for gamma to fit."""
    data = _tiny_data(400)
    clean = dv.train_run(dv.RunConfig("sigmoid", "exp", 1e-2, 0, 10, 64), *data)
    noisy = dv.train_run(dv.RunConfig("sigmoid", "exp", 1e-2, 0, 10, 64, train_noise=True), *data)
    assert clean["failed"] and min(clean["min_log_scale"]) < -100
    assert not noisy["failed"] and noisy["epochs_trained"] == 10 and min(noisy["min_log_scale"]) > -40


def _flat_model(scale):
    """A sigmoid-mu model whose mean is exactly 0 (pre-activation -120) and decoded raw scale -100 on
    every pixel: an all-black image is fitted exactly, and gamma = exp(-100) is below float32's
    normal range (log tiny = -87.3)."""
    torch.manual_seed(0)
    model = dv.VAE("sigmoid", scale)
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
        model.decoder[-1].bias[:dv.PIXELS] = -120.0
        model.decoder[-1].bias[dv.PIXELS:] = -100.0
    return model


def test_degenerate_rule_on_a_flat_image():
    """exp keeps the loss finite below the underflow (degenerate), naive_exp turns NaN once exp(p) is 0,
    a lower-bounded scale cannot degenerate."""
    black = torch.zeros(30, dv.PIXELS)
    data = (black, black[:10], black[:10])
    cfg = dict(mu="sigmoid", lr=1.0, seed=0, epochs=3, batch_size=10)
    exact = dv.train_run(dv.RunConfig(scale="exp", **cfg), *data, model=_flat_model("exp"))
    assert exact["failure"] == "degenerate" and exact["failed"]
    assert (exact["fail_epoch"], exact["fail_step"], exact["degenerate_step"]) == (1, 1, 1)
    assert exact["epochs_trained"] == 3 and all(math.isfinite(v) for v in exact["train_bpd"])  # trained on
    assert exact["min_log_scale"][0] <= -100 and exact["min_log_scale"][-1] < exact["min_log_scale"][0]
    assert exact["below_floor_epoch"] == 1  # -100 nats per pixel: far under what gamma >= alpha allows
    naive = dv.train_run(dv.RunConfig(scale="naive_exp", **cfg), *data, model=_flat_model("naive_exp"))
    assert naive["failure"] == "nan" and naive["degenerate_step"] == 1 and naive["fail_step"] > 1
    assert naive["test_bpd"] is None
    bounded = f"downbounded({dv.ALPHA})"
    safe = dv.train_run(dv.RunConfig(scale=bounded, **cfg), *data, model=_flat_model(bounded))
    assert not safe["failed"] and safe["degenerate_step"] is None and safe["below_floor_epoch"] is None
    assert min(safe["min_log_scale"]) >= math.log(scales.PIXEL_ALPHA) - 1e-5


def test_loss_floor_is_the_bounded_minimum():
    x = torch.rand(3, dv.PIXELS)
    log_alpha = torch.full_like(x, math.log(scales.PIXEL_ALPHA))
    best = -gaussian.log_prob(x, x, log_alpha).sum(1)  # mu = x exactly, gamma = alpha, KL = 0
    assert torch.allclose(best.double(), torch.full((3,), dv.LOSS_FLOOR, dtype=torch.float64))
    assert dv.LOSS_FLOOR == pytest.approx(-4601.05, abs=0.01)
    assert dv.UNDERFLOW_LOG == pytest.approx(-87.336, abs=1e-3)
    assert torch.exp(torch.tensor(dv.UNDERFLOW_LOG - 0.01)) < torch.finfo(torch.float32).tiny


def test_global_scale_is_one_parameter_for_every_pixel():
    torch.manual_seed(0)
    model = dv.VAE("identity", "global:naive_exp")
    assert model.spec == "global:naive_exp" and model.raw_global.shape == ()
    assert model.decoder[-1].out_features == dv.PIXELS
    x = torch.rand(4, dv.PIXELS)
    eps = torch.randn(4, dv.LATENT)
    with torch.no_grad():
        model.raw_global.fill_(-2.0)
        nelbo, log_scale = model(x, eps)
    assert log_scale.shape == () and float(log_scale) == pytest.approx(-2.0)
    # the same as a per-pixel model whose every pixel has raw scale -2
    z = model.encoder(x).chunk(2, 1)
    ref = dv.VAE("identity", "naive_exp")
    ref.encoder.load_state_dict(model.encoder.state_dict())
    with torch.no_grad():
        ref.decoder[0].load_state_dict(model.decoder[0].state_dict())
        ref.decoder[2].weight.zero_()
        ref.decoder[2].weight[:dv.PIXELS] = model.decoder[2].weight
        ref.decoder[2].bias[:dv.PIXELS] = model.decoder[2].bias
        ref.decoder[2].bias[dv.PIXELS:] = -2.0
        torch.testing.assert_close(ref(x, eps)[0], nelbo)
    assert z is not None
    with pytest.raises(ValueError, match="unknown"):
        dv.scale_spec("global:expp")


def test_summarize_counts_each_kind_of_failure_once():
    base = {"mu": "sigmoid", "scale": "naive_exp", "lr": 1e-4, "below_floor_epoch": None, "best_epoch": 5}
    runs = [{**base, "failure": "nan", "failed": True, "fail_epoch": 9, "test_bpd": None, "below_floor_epoch": 4},
            {**base, "failure": "nan", "failed": True, "fail_epoch": 13, "test_bpd": None},
            {**base, "failure": "degenerate", "failed": True, "fail_epoch": 7, "test_bpd": None},
            {**base, "failure": None, "failed": False, "fail_epoch": None, "test_bpd": 2.0},
            {**base, "scale": "exp", "failure": None, "failed": False, "fail_epoch": None, "test_bpd": 1.0},
            {**base, "scale": "exp", "failure": None, "failed": False, "fail_epoch": None, "test_bpd": 3.0}]
    rows = {r["scale"]: r for r in dv.summarize(runs)}
    naive = rows["naive_exp"]
    assert (naive["nan"], naive["degenerate"], naive["failed"], naive["sound"], naive["seeds"]) == (2, 1, 3, 1, 4)
    assert naive["test_bpd_mean"] == 2.0 and naive["below_floor"] == 1
    assert rows["exp"]["failed"] == 0 and rows["exp"]["test_bpd_std"] == pytest.approx(math.sqrt(2))
    lines = dv.table_lines(dv.summarize(runs))
    assert "| sigmoid | naive_exp | 0.0001 | 2/4 (9-13) | 1/4 (7) | 1/4 (4) | 2.00 (n=1) | 100% NaN |" in lines
    assert "| sigmoid | exp | 0.0001 | 0/2 | 0/2 | 0/2 | 2.00 ± 1.41 (n=2) | 100% NaN |" in lines
    assert dv.label(scales.get(f"bounded({dv.ALPHA}, 1)").spec) == "bounded(α, 1)"


def test_paper_column_names_every_row_of_table3():
    for spec in dv.SCALES:
        for mu in dv.MUS:
            assert paper_tables.table3(dv.scale_spec(spec), mu), (spec, mu)
    assert paper_tables.table3(dv.scale_spec(f"bounded({dv.ALPHA}, 1)"), "sigmoid") == "4.56 ± 0.05"
    assert paper_tables.table3("global:naive_exp", "identity") == "6.67 ± 0.004"
    assert paper_tables.table3("softplus", "identity") == ""


# ---------------------------------------------------------------- CLI

def _check_outputs(out, stdout):
    doc = json.loads((out / "decoder_variance.json").read_text())
    runs, cells = doc["runs"], doc["cells"]
    assert len(runs) == 2 and {r["scale"] for r in runs} == {scales.get(s).spec for s in ("naive_exp", f"bounded({dv.ALPHA}, 1)")}
    assert all(r["epochs_trained"] == 2 or r["failed"] for r in runs)
    assert doc["meta"]["s_per_epoch"] > 0
    for r in runs:
        if r["test_bpd"] is not None:
            assert r["test_bpd"] == pytest.approx(dv.bits_per_dim(r["test_nelbo"]))
    assert cells == dv.summarize(runs)  # the table's numbers are the runs' numbers
    md = (out / "decoder_variance.md").read_text()
    for row in cells:
        line = dv.row_line(row)
        assert line in md.splitlines() and line in stdout.splitlines()
        assert f"| {row['nan']}/{row['seeds']}" in line and f"| {row['degenerate']}/{row['seeds']}" in line
        if row["test_bpd_mean"] is not None:
            assert f"{row['test_bpd_mean']:.2f}" in line
        assert line.endswith(f"| {paper_tables.table3(row['scale'], row['mu'])} |")
    png = (out / "decoder_variance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "s/epoch" in stdout and "paper: Dehaene & Brossard Table 3" in stdout
    assert "without noise (the paper's protocol)" in stdout and doc["meta"]["train_noise"] is False


def test_quick_cli_writes_consistent_outputs(tmp_path, capsys):
    np.savez(tmp_path / "small.npz", data=_images(400, seed=5))
    out = tmp_path / "out"
    assert dv.main(["--quick", "--data", str(tmp_path / "small.npz"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "400 images -> 320 train / 40 validation / 40 test" in stdout
    _check_outputs(out, stdout)


@needs_mnist
def test_real_mnist_quick(tmp_path, capsys):
    images = dv.load_mnist(REAL_MNIST)
    assert images.shape[1:] == (28, 28) and images.dtype == np.uint8 and len(images) >= 1000
    assert 0 < images.mean() < 128 and images.max() == 255  # dark background, bright strokes
    out = tmp_path / "out"
    assert dv.main(["--quick", "--data", str(REAL_MNIST), "--out", str(out)]) == 0
    _check_outputs(out, capsys.readouterr().out)
