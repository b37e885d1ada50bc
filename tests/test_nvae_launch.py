"""`vaepatch run nvae` on the real NVlabs/NVAE train.py, on CPU, with a CIFAR-format dataset.

Needs the clone ($VAEPATCH_NVAE or third_party/nvae); without it every test here is skipped
with the reason. Each run is its own process (NVAE's module names would clash with other tests).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vaepatch import cifar_format, compare
from vaepatch.runs import events
from vaepatch.runs.prerun import free_port
from tests.nvae_support import nvae_clone

CLONE, WHY_NOT = nvae_clone()
pytestmark = pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")
REPO = Path(__file__).resolve().parents[1]
# NVAE's smallest model on its default cifar10 input; 64 training images of batch 8 = 8 steps an epoch
TINY = ["--dataset", "cifar10", "--batch_size", "8", "--warmup_epochs", "0", "--num_channels_enc", "4",
        "--num_channels_dec", "4", "--num_latent_scales", "2", "--num_groups_per_scale", "2",
        "--num_latent_per_group", "2", "--num_preprocess_blocks", "1", "--num_preprocess_cells", "1",
        "--num_postprocess_blocks", "1", "--num_postprocess_cells", "1", "--num_mixture_dec", "1", "--use_se"]
STEPS_PER_EPOCH = 8
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return cifar_format.make(tmp_path_factory.mktemp("cifar"), n_train=8 * STEPS_PER_EPOCH, n_test=4, for_target="nvae")


def _run(out, data, variant="vanilla", epochs=1, launcher=(), extra=()):
    command = [sys.executable, "-m", "vaepatch", "run", "nvae", "--variant", variant, "--out", str(out), "--cpu",
               "--upstream", str(CLONE), "--master-port", str(free_port()), *launcher, "--",
               *TINY, "--data", str(data), "--root", str(out / "nvae"), "--save", "t", "--epochs", str(epochs), *extra]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=400)


def _manifest(out):
    return json.loads((out / "run.json").read_text())


def _nvae_train_nelbo(out):
    """NVAE's own per-epoch training loss, from its log: the mean of the step losses."""
    return [float(v) for v in re.findall(r"train_nelbo ([-\d.naif]+)", (out / "nvae" / "eval-t" / "log.txt").read_text())]


def test_every_step_logged_matches_nvae_own_epoch_loss(tmp_path, data):
    out = tmp_path / "run"
    result = _run(out, data, epochs=1)
    assert result.returncode == 0, result.stderr[-3000:]
    log = events.read(out)
    assert [(e["step"], e["rank"]) for e in log.events] == [(s, 0) for s in range(STEPS_PER_EPOCH)]
    assert all(e["finite"] and not e["skipped"] and e["grad_norm"] > 0 for e in log.events)
    (nelbo,) = _nvae_train_nelbo(out)
    assert sum(e["loss"] for e in log.events) / STEPS_PER_EPOCH == pytest.approx(nelbo, rel=1e-5)
    manifest = _manifest(out)
    assert (manifest["target"], manifest["status"], manifest["loss_unit"]) == ("nvae", "completed", "nats/image")
    assert manifest["world_size"] == 1 and manifest["upstream_logdir"] == str(out / "nvae" / "eval-t")
    # on the CPU NVAE gets torch.amp's CPU grad scaler: a non-finite step is skipped as AMP does on a GPU
    assert {"cpu-sync-batchnorm", "cpu-grad-scaler"} <= {s["name"] for s in manifest["compat"]}
    assert manifest["weights_finite"] is True
    assert manifest["fuse"] is False and manifest["fuse_reason"] == "vanilla: nothing is patched"
    # compare reads NVAE's own validation NELBO, and converts it to bits/dim with NVAE's own factor
    text = (out / "nvae" / "eval-t" / "log.txt").read_text()
    final = float(re.search(r"final valid nelbo (\S+)", text).group(1))
    epoch_nelbo = float(re.search(r"valid_nelbo (\S+)", text).group(1))
    epoch_bpd = float(re.search(r"valid bpd elbo (\S+)", text).group(1))
    run = compare.load_run(out)
    assert run.eval_final == final and run.eval_best == min(final, epoch_nelbo)
    assert run.bits_per_dim == pytest.approx(final * epoch_bpd / epoch_nelbo, rel=1e-5)


def test_continuing_from_nvae_checkpoint_logs_no_step_twice(tmp_path, data):
    out = tmp_path / "run"
    stopped = _run(out, data, epochs=2, launcher=["--max-steps", "12"])  # dies mid-epoch 2; checkpoint at step 8
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    fresh = _run(out, data, epochs=2)  # starting over would mix two trajectories in one file
    assert fresh.returncode == 2 and "mix two trajectories" in fresh.stderr
    more = _run(out, data, epochs=2, extra=["--cont_training"])  # NVAE's own restart re-runs steps 8..15
    assert more.returncode == 0, more.stderr[-3000:]
    log = events.read(out)
    assert [e["step"] for e in log.events] == list(range(2 * STEPS_PER_EPOCH)) and log.duplicates == 0
    sessions = _manifest(out)["sessions"]
    assert [(s["status"], s["steps_logged"]) for s in sessions] == [("stopped at --max-steps 12", 12),
                                                                     ("completed", 4)]
    assert "torch-load-namespace" in [s["name"] for s in _manifest(out)["compat"]]


def test_the_variant_reaches_every_process_nvae_starts(tmp_path, data):
    runs = {}
    for variant in ("vanilla", "upbounded1-cst1", "upbounded1-cst1"):
        out = tmp_path / f"{variant}-{len(runs)}"
        result = _run(out, data, variant=variant, launcher=["--max-steps", "2"], extra=["--num_process_per_node", "2"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert _manifest(out)["status"] == "stopped at --max-steps 2" and _manifest(out)["world_size"] == 2
        assert _manifest(out)["sessions"][-1]["exit_codes"] == {"0": 75, "1": 75}  # both stopped at --max-steps
        log = events.read(out)
        assert sorted((e["step"], e["rank"]) for e in log.events) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        by_step = {}
        for e in log.events:
            by_step.setdefault(e["step"], set()).add(e["grad_norm"])
        assert all(len(norms) == 1 for norms in by_step.values())  # gradients averaged over the two processes
        runs[out.name] = {(e["step"], e["rank"]): e["loss"] for e in log.events}
    vanilla, patched, again = runs.values()
    assert patched == again  # same seed, same variant: the same run
    assert all(patched[key] != vanilla[key] for key in vanilla)  # each process ran the patched model


def test_fuse_reaches_nvae_and_keeps_the_eager_losses(tmp_path, data):
    """``--fuse`` compiles the patched per-group math in the process NVAE trains in (run.json and the
    printed line say so); the losses are the eager run's. On CPU the default is eager."""
    losses = {}
    for launcher in ([], ["--fuse"]):
        out = tmp_path / ("fused" if launcher else "eager")
        result = _run(out, data, variant="upbounded1", launcher=["--max-steps", "3", *launcher])
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = _manifest(out)
        assert manifest["fuse"] is bool(launcher)
        why = "fused (torch.compile), as asked (--fuse)" if launcher else "eager (on CPU"
        assert why in manifest["fuse_reason"] and f"vaepatch: per-group math {why}" in result.stdout
        assert "torch.compile of the fused block math failed" not in result.stderr
        losses[out.name] = [e["loss"] for e in events.read(out).events]
    assert len(losses["fused"]) == 3
    assert losses["fused"] == pytest.approx(losses["eager"], rel=1e-5)


def test_an_ou_variant_trains_in_every_process(tmp_path, data):
    """OU smoothing under NVAE's own two-process training (gloo, batch norms synchronised)."""
    runs = {}
    for variant in ("upbounded1", "upbounded1,ou=0.9x3"):
        out = tmp_path / variant.replace(",", "_")
        result = _run(out, data, variant=variant, launcher=["--max-steps", "2"], extra=["--num_process_per_node", "2"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert _manifest(out)["variant"] == variant
        log = events.read(out)
        assert len(log.events) == 4 and all(e["finite"] and not e["skipped"] for e in log.events)
        runs[variant] = {(e["step"], e["rank"]): e["loss"] for e in log.events}
    plain, smoothed = runs.values()
    assert plain[(0, 0)] != smoothed[(0, 0)] and plain[(0, 1)] != smoothed[(0, 1)]


def test_a_crash_is_recorded_with_its_cause(tmp_path, data):
    """A crash inside NVAE (a training batch file that is not a pickle: a missing one is refused
    before NVAE starts) ends in run.json with the exception that ended it."""
    import shutil

    corrupt = shutil.copytree(data, tmp_path / "corrupt")
    (corrupt / cifar_format.FOLDER / "data_batch_1").write_bytes(b"not a pickle")
    out = tmp_path / "run"
    result = _run(out, corrupt, epochs=1)
    assert result.returncode != 0
    assert _manifest(out)["status"].startswith("crashed: UnpicklingError")


def test_smoke_script_runs_nvae_end_to_end_then_skips_what_completed(tmp_path):
    out = tmp_path / "smoke"
    script = ["bash", str(REPO / "run_scripts" / "nvae_cifar.sh"), "--smoke", "--variants", "upbounded1-cst1",
              "--out", str(out), "--upstream", str(CLONE), "--port", str(free_port())]
    env = dict(ENV, PYTHON=sys.executable)
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("| variant |"):]
    assert "| upbounded1-cst1 | 1 | 1/1 | 8 | 0 |" in table  # one run, passed, 8 steps, no NaN step
    run = out / "upbounded1-cst1-seed0"
    manifest = _manifest(run)
    assert manifest["status"] == "completed" and "--res_dist" in manifest["argv"]
    assert [e["step"] for e in events.read(run).events] == list(range(STEPS_PER_EPOCH))
    assert "final valid nelbo" in (run / "nvae" / "eval-upbounded1-cst1-seed0" / "log.txt").read_text()
    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert "completed earlier, skipped" in again.stdout



def test_continuing_without_a_checkpoint_is_caught_before_nvae_starts(tmp_path, data):
    result = _run(tmp_path / "run", data, extra=["--cont_training"])
    assert result.returncode == 2 and "no checkpoint at" in result.stderr and "checkpoint.pt" in result.stderr


def test_missing_dataset_is_named_before_nvae_starts(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    result = _run(tmp_path / "run", empty)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "missing cifar-10-batches-py/data_batch_1" in result.stderr and "test_batch" in result.stderr
    assert cifar_format.CIFAR_SOURCE in result.stderr and "vaepatch make-data" in result.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def _kl_coeff(step, total_iters, anneal=0.3, const=0.0001, const_coeff=0.0001):
    """NVAE's KL weight at ``step`` (utils.kl_coeff with train.py's default --kl_anneal_portion,
    --kl_const_portion and --kl_const_coeff), written out here."""
    return max(min((step - const * total_iters) / (anneal * total_iters), 1.0), const_coeff)


def test_events_carry_the_loss_parts(tmp_path, data):
    """train.py's loss is recon + kl_coeff * (balanced KL) + wdn * (spectral + BN regularizers), and wdn is 0
    here (--weight_decay_norm's default). Once kl_coeff reaches 1 (step 3 of this 8-step run) NVAE stops
    balancing: the loss is exactly recon + the sum of the groups' KL, the two parts the events carry. Before,
    the KL weighs kl_coeff times a weighted sum of the 2 x 2 groups (weights of mean 1, so at most 4 x kl)."""
    out = tmp_path / "run"
    assert _run(out, data, epochs=1).returncode == 0
    log = events.read(out).events
    assert [e["step"] for e in log] == list(range(STEPS_PER_EPOCH))
    assert all(e["kl"] > 0 and e["recon"] > 0 and "where" not in e for e in log)
    coeffs = [_kl_coeff(e["step"], STEPS_PER_EPOCH) for e in log]
    assert coeffs[:3] == [0.0001, pytest.approx(0.41633, rel=1e-4), pytest.approx(0.83300, rel=1e-4)]
    assert coeffs[3:] == [1.0] * 5
    for e, coeff in zip(log, coeffs):
        if coeff == 1.0:
            assert e["loss"] == pytest.approx(e["recon"] + e["kl"], rel=1e-6, abs=1e-3), e
        else:
            assert 0 < e["loss"] - e["recon"] <= 4 * coeff * e["kl"] * (1 + 1e-4) + 1e-3, (coeff, e)
    # NVAE's own logged training NELBO (the mean of the step losses) from the parts, where they make the loss
    (nelbo,) = _nvae_train_nelbo(out)
    from_parts = [e["recon"] + e["kl"] if coeff == 1.0 else e["loss"] for e, coeff in zip(log, coeffs)]
    assert sum(from_parts) / STEPS_PER_EPOCH == pytest.approx(nelbo, rel=1e-5)
