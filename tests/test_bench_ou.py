"""The OU benches (ou-collapse, phase, ou-cost) at smoke size on synthetic images."""
import json

import numpy as np
import pytest
import torch

from vaepatch.bench.cost import ou_smoothing as ou_cost
from vaepatch.bench.ou import collapse as ou_collapse, phase as ou_phase
from vaepatch.models import MLPHierarchy


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def mnist_like(tmp_path):
    """200 28x28 uint8 images: a few blurry strokes each, like digits to a Bernoulli decoder."""
    rng = np.random.default_rng(0)
    images = np.zeros((200, 28, 28), np.uint8)
    for img, c in zip(images, rng.integers(0, 4, 200)):
        img[4 + 4 * c:10 + 4 * c, 6:22] = 255
        img[:, 12 + c:15 + c] = 200
    path = tmp_path / "mnist.npz"
    np.savez(path, data=images)
    return path


TINY = ["--steps", "3", "--n-train", "150", "--n-val", "40", "--k", "3", "--latents", "6,5", "--jobs", "1"]


def test_ou_collapse_quick_writes_everything_and_prints_both_active_unit_counts(mnist_like, tmp_path, capsys):
    out = tmp_path / "collapse"
    rc = ou_collapse.main(["--quick", "--data", str(mnist_like), "--out", str(out), "--seeds", "2",
                           "--passes", "3", "--rhos", "0.9", *TINY])
    text = capsys.readouterr().out
    assert rc == 0
    assert "top-layer KL" in text and "corrected" in text and "paper" in text and "L_k" in text
    assert "ou rho=0.9 K=5" in text and "vanilla" in text
    data = json.loads((out / "ou_collapse.json").read_text())
    assert len(data["runs"]) == 4 and {r["config"] for r in data["runs"]} == {"vanilla", "ou rho=0.9 K=5"}
    run = data["runs"][0]
    assert len(run["kl_per_layer"]) == 2 and len(run["active_paper"]) == 2 and len(run["active_corrected"]) == 2
    assert run["iw_bound"] >= run["elbo"] - 5 and run["steps_done"] == 3
    assert (out / "ou_collapse.png").stat().st_size > 1000 and (out / "ou_collapse.md").is_file()


def test_ou_collapse_without_data_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VAEPATCH_MNIST", raising=False)
    rc = ou_collapse.main(["--data", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "yann.lecun.com" in err
    assert not (tmp_path / "o").exists()


def test_phase_quick_prints_the_critical_rho_and_plots(mnist_like, tmp_path, capsys):
    out = tmp_path / "phase"
    rc = ou_phase.main(["--quick", "--data", str(mnist_like), "--out", str(out), "--rhos", "0.5,1.0",
                        "--seeds", "2", *TINY])
    text = capsys.readouterr().out
    assert rc == 0 and "critical rho" in text and "plateau" in text
    data = json.loads((out / "ou_phase.json").read_text())
    assert [row["rho"] for row in data["rows"]] == [0.5, 1.0] and all(len(r["top_kl"]) == 2 for r in data["rows"])
    assert "critical_rho" in data and (out / "ou_phase.png").stat().st_size > 1000


def test_critical_rho_rule():
    rhos = [0.8, 0.85, 0.88, 0.9, 0.95]
    crit, plateau = ou_phase.critical_rho(rhos, [10.0, 9.5, 9.0, 4.0, 0.1])
    assert plateau == 10.0 and crit == pytest.approx(0.88 + 0.8 * 0.02)  # half = 5 between 9 and 4
    assert ou_phase.critical_rho(rhos[::-1], [10.0, 9.5, 9.0, 4.0, 0.1][::-1])[0] == pytest.approx(crit)
    assert ou_phase.critical_rho(rhos, [10.0, 9.0, 8.0, 7.0, 6.0])[0] is None  # never below half
    assert ou_phase.critical_rho(rhos, [0.2, 0.1, 0.0, 0.0, 0.0])[0] is None  # collapsed everywhere


def test_analytic_flops_match_torchs_count():
    torch.manual_seed(0)
    model = MLPHierarchy(x_dim=20, latents=(5, 4, 3), hidden=16, variant="vanilla,ou=0.9x3")
    x = torch.bernoulli(torch.full((8, 20), 0.3))
    counted = ou_cost.counted_flops(lambda: model(x)["loss"].backward())
    flops = ou_cost.mlp_flops(x_dim=20, latents=(5, 4, 3), hidden=16, batch=8, samples=3)
    assert counted == flops["total"]
    assert flops["ratio"] == pytest.approx(1 + 2 * flops["smoothed_share_of_plain"])


def test_saved_activations_grow_with_k():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((10, 20), 0.3))
    sizes = []
    for variant in ("vanilla", "vanilla,ou=0.9x3", "vanilla,ou=0.9x6"):
        model = MLPHierarchy(x_dim=20, latents=(5, 4, 3), hidden=16, variant=variant)
        sizes.append(ou_cost.saved_bytes(lambda: model(x)["loss"], model.parameters()))
    assert 0 < sizes[0] < sizes[1] < sizes[2]


def test_ou_cost_quick_prints_ratios(tmp_path, capsys):
    out = tmp_path / "cost"
    rc = ou_cost.main(["--quick", "--out", str(out), "--vdvae", "off", "--nvae", "off", "--rss-steps", "0",
                       "--steps", "2",
                       "--warmup", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and "time x" in text and "FLOP x" in text and "ou rho=0.9 K=5" in text
    rows = json.loads((out / "ou_cost.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["plain", "ou rho=0.9 K=5"]
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["time_ratio"] > 0
    assert rows[1]["flop_ratio"] == pytest.approx(1 + 4 * rows[0]["smoothed_share"])
    assert rows[1]["saved_ratio"] > 1.5 and rows[0]["flops_counted"] == rows[0]["flops"]


@pytest.mark.parametrize("groups", [1, 8, 32])
def test_counted_flops_count_a_grouped_convolution_backward_as_twice_its_forward(groups):
    """torch's FlopCounterMode alone counts a depthwise conv's backward ~groups times over."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    forward = ou_cost.counted_flops(lambda: conv(x))
    assert forward == 2 * 2 * 32 * (32 // groups) * 9 * 64
    assert ou_cost.counted_flops(lambda: conv(x).sum().backward()) == 3 * forward
    x.requires_grad_(False)  # first layer: no input gradient, only the weight's
    assert ou_cost.counted_flops(lambda: conv(x).sum().backward()) == 2 * forward


RESUMABLE = ["--seeds", "1", "--rhos", "0.9", "--passes", "3", "--eval-every", "2", "--checkpoint-every", "2", *TINY,
             "--steps", "7"]
TIMES = ("train_seconds", "eval_seconds")


def _numbers(out):
    """Every run's numbers in the JSON, wall times left out."""
    runs = json.loads((out / "ou_collapse.json").read_text())["runs"]
    for r in runs:
        for key in TIMES:
            r.pop(key)
        for e in r["evals"]:
            e.pop("train_seconds")
    return runs


def test_ou_collapse_resumed_after_an_interruption_gives_the_uninterrupted_numbers(mnist_like, tmp_path, monkeypatch,
                                                                                   capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert ou_collapse.main(["--data", str(mnist_like), "--out", str(full), *RESUMABLE]) == 0
    calls, forward = [], MLPHierarchy.forward

    def interrupted(self, x, beta=1.0):  # the 6th training step of the first run (vanilla) never returns
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return forward(self, x, beta)

    monkeypatch.setattr(MLPHierarchy, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ou_collapse.main(["--data", str(mnist_like), "--out", str(part), *RESUMABLE])
    monkeypatch.undo()
    [saved] = (part / "checkpoints").glob("*.pt")
    assert saved.name == "vanilla-seed0.pt" and torch.load(saved, weights_only=False)["step"] == 4
    capsys.readouterr()
    assert ou_collapse.main(["--data", str(mnist_like), "--out", str(part), *RESUMABLE]) == 2  # not without --resume
    assert "--resume" in capsys.readouterr().err
    assert ou_collapse.main(["--data", str(mnist_like), "--out", str(part), *RESUMABLE, "--lr", "0.01", "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert ou_collapse.main(["--data", str(mnist_like), "--out", str(part), *RESUMABLE, "--resume"]) == 0
    resumed, uninterrupted = _numbers(part), _numbers(full)
    assert resumed == uninterrupted
    assert [e["step"] for e in resumed[0]["evals"]] == [2, 4, 6, 7] and resumed[0]["steps_done"] == 7
    assert len(resumed[0]["evals"][0]["active_paper"]) == 2
    assert (part / "ou_collapse_training.png").stat().st_size > 1000
    assert "Along training" in capsys.readouterr().out


def test_ou_collapse_prints_the_papers_table1_beside_ours(mnist_like, tmp_path, capsys):
    assert ou_collapse.main(["--data", str(mnist_like), "--out", str(tmp_path / "o"), "--seeds", "1", "--rhos", "",
                             "--passes", "3", *TINY]) == 0
    text = capsys.readouterr().out
    assert "paper OU-VAE rho=0.95" in text and "40-40-40-40" in text and "-84.4" in text and "1M" in text
    assert "ours vanilla" in text


def test_kl_warmup_scales_only_the_kl_in_the_training_loss():
    torch.manual_seed(0)
    model = MLPHierarchy(x_dim=20, latents=(5, 4), hidden=16)
    x = torch.bernoulli(torch.full((8, 20), 0.3))
    outs = []
    for beta in (1.0, 0.25):
        torch.manual_seed(1)
        outs.append(model(x, beta=beta))
    full, warm = outs
    assert torch.equal(full["elbo"], warm["elbo"])  # the reported ELBO is the true one
    assert float(full["loss"].detach()) == pytest.approx(float(-full["elbo"]), rel=1e-6)
    assert float(warm["loss"].detach()) == pytest.approx(float(full["recon"] + 0.25 * full["kl_per_layer"].sum()), rel=1e-5)


def test_phase_passes_warmup_and_init_to_every_run(mnist_like, tmp_path):
    found = []
    for extra in ([], ["--warmup", "1000"], ["--init", "glorot"]):
        out = tmp_path / f"phase{len(found)}"
        assert ou_phase.main(["--quick", "--data", str(mnist_like), "--out", str(out), "--rhos", "0.5,1.0",
                              "--seeds", "1", *TINY, *extra]) == 0
        found.append(json.loads((out / "ou_phase.json").read_text()))
    plain, warm, glorot = ([r["kl_per_layer"] for r in doc["runs"]] for doc in found)
    assert plain != warm and plain != glorot
    assert found[1]["meta"]["warmup"] == 1000 and found[2]["meta"]["init"] == "glorot"
