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
from vaepatch.bench import decoder_variance as dv

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
    train, test = dv.split(images)
    assert (len(train), len(test)) == (9000, 1000)
    tag = lambda a: a[:, 0, 0].astype(int) * 256 + a[:, 0, 1]
    assert set(tag(train)).isdisjoint(tag(test)) and len(set(tag(train)) | set(tag(test))) == 10000
    train2, test2 = dv.split(images)
    np.testing.assert_array_equal(tag(test), tag(test2))
    assert not np.array_equal(np.sort(tag(test)), np.arange(9000, 10000))  # shuffled, not the tail


def test_split_spec_list():
    assert dv._split_specs("naive_exp,bounded(1/(256*sqrt(12)), 1),exp") == ["naive_exp", "bounded(1/(256*sqrt(12)), 1)", "exp"]
    assert dv._split_specs("exp; bounded(0.1, 1)") == ["exp", "bounded(0.1, 1)"]


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
    train, test = dv.split(images)
    return dv._levels(train), dv._levels(test)


def test_one_epoch_is_deterministic_per_seed():
    train, test = _tiny_data()
    cfg = dv.RunConfig("sigmoid", "bounded(1/(256*sqrt(12)), 1)", 1e-3, seed=3, epochs=1, batch_size=64)
    runs, states = [], []
    for c in (cfg, cfg, dv.RunConfig(**{**cfg.__dict__, "seed": 4})):
        torch.manual_seed(c.seed)
        model = dv.VAE(c.mu, c.scale)
        runs.append(dv.train_run(c, train, test, model=model))
        states.append(model.state_dict())
    a, b, other = runs
    assert not a["failed"] and a["epochs_trained"] == 1 and math.isfinite(a["test_bpd"])
    assert a["train_bpd"] == b["train_bpd"] and a["test_bpd"] == b["test_bpd"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert other["train_bpd"] != a["train_bpd"]
    assert not torch.equal(states[0]["decoder.2.weight"], states[2]["decoder.2.weight"])
    assert a["test_bpd"] == pytest.approx(dv.bits_per_dim(a["test_nelbo"]))


def _forced(scale, raw=-200.0):
    """A model whose decoded raw scale parameter starts at ~raw: exp(raw) underflows in float32."""
    torch.manual_seed(0)
    model = dv.VAE("sigmoid", scale)
    with torch.no_grad():
        model.decoder[-1].bias[dv.PIXELS:] = raw
    return model


def test_nan_is_detected_and_recorded():
    train, test = _tiny_data()
    cfg = dv.RunConfig("sigmoid", "naive_exp", 1e-3, seed=0, epochs=3, batch_size=64)
    r = dv.train_run(cfg, train, test, model=_forced("naive_exp"))
    assert r["failed"] and r["fail_epoch"] == 1 and r["fail_step"] == 1
    assert r["fail_value"] in ("nan", "inf", "-inf") and r["epochs_trained"] == 0
    assert r["test_bpd"] is None and r["train_bpd"] == []
    # the same forced parameter with a bounded scale: sigma = alpha, finite throughout
    cfg_b = dv.RunConfig("sigmoid", "bounded(1/(256*sqrt(12)), 1)", 1e-3, seed=0, epochs=1, batch_size=64)
    rb = dv.train_run(cfg_b, train, test, model=_forced(cfg_b.scale))
    assert not rb["failed"] and rb["epochs_trained"] == 1 and math.isfinite(rb["test_bpd"])


def test_nan_in_a_later_epoch_records_that_epoch():
    train, test = _tiny_data()
    cfg = dv.RunConfig("identity", "naive_exp", 1e-3, seed=0, epochs=4, batch_size=64)
    torch.manual_seed(cfg.seed)
    model = dv.VAE(cfg.mu, cfg.scale)

    def sabotage(epoch):  # after epoch 2, push the raw scale parameter where exp underflows
        if epoch == 2:
            with torch.no_grad():
                model.decoder[-1].bias[dv.PIXELS:] = -200.0

    r = dv.train_run(cfg, train, test, model=model, on_epoch=sabotage)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    assert r["failed"] and r["fail_epoch"] == 3 and r["fail_step"] == 2 * steps_per_epoch + 1
    assert r["epochs_trained"] == 2 and len(r["train_bpd"]) == 2


def test_summarize_counts_failures_per_cell():
    base = {"mu": "sigmoid", "scale": "naive_exp", "lr": 1e-3}
    runs = [{**base, "failed": True, "fail_epoch": 9, "test_bpd": None},
            {**base, "failed": True, "fail_epoch": 4, "test_bpd": None},
            {**base, "failed": False, "fail_epoch": None, "test_bpd": 2.0},
            {**base, "scale": "exp", "failed": False, "fail_epoch": None, "test_bpd": 1.0},
            {**base, "scale": "exp", "failed": False, "fail_epoch": None, "test_bpd": 3.0}]
    rows = {r["scale"]: r for r in dv.summarize(runs)}
    assert rows["naive_exp"]["failed"] == 2 and rows["naive_exp"]["seeds"] == 3
    assert (rows["naive_exp"]["fail_epoch_min"], rows["naive_exp"]["fail_epoch_max"]) == (4, 9)
    assert rows["naive_exp"]["test_bpd_mean"] == 2.0 and rows["naive_exp"]["finite"] == 1
    assert rows["exp"]["failed"] == 0 and rows["exp"]["test_bpd_mean"] == 2.0
    assert rows["exp"]["test_bpd_std"] == pytest.approx(math.sqrt(2))
    lines = dv.table_lines(dv.summarize(runs))
    assert "| sigmoid | naive_exp | 0.001 | 2/3 | 4-9 | 2.000 (n=1) |" in lines
    assert "| sigmoid | exp | 0.001 | 0/2 | - | 2.000 ± 1.414 (n=2) |" in lines
    assert dv.label(scales.get(f"bounded({dv.ALPHA}, 1)").spec) == "bounded(α, 1)"


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
        assert f"| {row['failed']}/{row['seeds']} |" in line
        if row["test_bpd_mean"] is not None:
            assert f"{row['test_bpd_mean']:.3f}" in line
    png = (out / "decoder_variance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "s/epoch" in stdout and "2106.13739" in stdout


def test_quick_cli_writes_consistent_outputs(tmp_path, capsys):
    np.savez(tmp_path / "small.npz", data=_images(400, seed=5))
    out = tmp_path / "out"
    assert dv.main(["--quick", "--data", str(tmp_path / "small.npz"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "400 images -> 360 train / 40 test" in stdout
    _check_outputs(out, stdout)


@needs_mnist
def test_real_mnist_quick(tmp_path, capsys):
    images = dv.load_mnist(REAL_MNIST)
    assert images.shape[1:] == (28, 28) and images.dtype == np.uint8 and len(images) >= 1000
    assert 0 < images.mean() < 128 and images.max() == 255  # dark background, bright strokes
    out = tmp_path / "out"
    assert dv.main(["--quick", "--data", str(REAL_MNIST), "--out", str(out)]) == 0
    _check_outputs(out, capsys.readouterr().out)
