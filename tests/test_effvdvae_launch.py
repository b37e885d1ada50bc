"""`vaepatch run effvdvae --cpu`: the real train.py on the tiny configuration writes one event per step and a
run.json with the shims it ran on; threshold skips and NaN skips are counted apart (upstream counts them together)."""
from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest
import torch

from tests.effvdvae_support import require_effvdvae
from vaepatch import run_command, upstream
from vaepatch.runs import events
from vaepatch.targets.effvdvae import config, tiny
from vaepatch.targets.effvdvae.recorder import StepRecorder

CPU_SHIMS = {"cpu-cuda-calls", "cpu-cuda-tensors", "cpu-calculate-z", "cpu-gpu-count", "cpu-set-device", "cpu-gloo",
             "cpu-device-index", "tensorflow-cifar10"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny.make_data(tmp_path_factory.mktemp("effvdvae-data"), steps=4)


def _run(tmp_path, data, variant, steps=3, extra=()):
    clone = require_effvdvae()
    out = tmp_path / variant
    options, train = tiny.run_args(out, data, seed=0, lr=0.001, port=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run_command.main(["effvdvae", "--variant", variant, "--out", str(out), "--cpu", "--max-steps",
                                 str(steps), *options, "--", *train, *extra])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    upstream.verify(clone, "effvdvae")  # the run wrote its own config: the clone is untouched
    return out, json.loads((out / "run.json").read_text()), events.read(out).events


@pytest.mark.parametrize("variant", ["vanilla", "qfloor-cst1"])
def test_a_tiny_real_run_writes_events_and_run_json(tmp_path, data, variant, capsys):
    cwd, path = os.getcwd(), list(sys.path)
    out, manifest, logged = _run(tmp_path, data, variant)
    assert [e["step"] for e in logged] == [0, 1, 2]
    for e in logged:
        assert e["finite"] and not e["skipped"] and e["reason"] is None and e["grad_norm"] > 0
        assert e["loss"] == pytest.approx(e["kl"] + e["recon"]) and set(e["scale"]) == {"posterior", "prior"}
    if variant == "qfloor-cst1":  # the prior's sigma is 1: log sigma 0 in every event
        assert all(e["scale"]["prior"]["log_sigma"] == [0.0, 0.0] for e in logged)
    else:  # the events' loss is upstream's own NELBO (it prints bits/dim, rounded to 4 places)
        printed = [float(v) for v in re.findall(r"\('nelbo', ([-\d.]+)\)", capsys.readouterr().out)]
        assert printed == pytest.approx([e["loss"] / math.log(2) for e in logged], abs=6e-5)
    assert manifest["target"] == "effvdvae" and manifest["variant"] == variant
    assert manifest["upstream_commit"] == upstream.pin("effvdvae").commit
    bundle = "4685c8377bf97eb4b9bc8c0899fa5a5c132f768a"  # upstream's f779c40 repackaged: the same tree
    assert manifest["upstream_checkout"] in (upstream.pin("effvdvae").commit, bundle)
    assert manifest["status"] == "stopped at --max-steps 3" and manifest["weights_finite"] is True
    assert CPU_SHIMS <= {shim["name"] for shim in manifest["compat"]}
    assert manifest["config"]["overrides"]["run.num_gpus"] == "1" and (out / "hparams.cfg").is_file()
    assert (out / "checkpoints-tiny").is_file()  # upstream's own checkpoint (it evaluates after step 0)
    assert os.getcwd() == cwd and sys.path == path and "model.latent_layers" not in sys.modules  # nothing left


def test_a_real_threshold_skip_is_a_grad_skip(tmp_path, data, capsys):
    """Upstream's rule at a threshold the tiny model's gradient norm always reaches: every update skipped, each
    counted as a threshold skip (upstream's own GradSkipCount counts them with its NaN skips)."""
    _, manifest, logged = _run(tmp_path, data, "vanilla", steps=2, extra=["optimizer.gradient_skip_threshold=0.0"])
    assert [(e["skipped"], e["reason"]) for e in logged] == [(True, "grad"), (True, "grad")]
    assert "('GradSkipCount', 2.0)" in capsys.readouterr().out
    counts = events.count(logged)
    assert (counts.grad_skips, counts.nan_steps) == (2, 0)
    assert logged[0]["where"]["grad_top"]  # what drove the skipped step's gradient


class _Case:
    """One fake step: the loss parts compute_loss returns (bits/dim), the gradient norm, upstream's decision."""

    def __init__(self, recon, kl, norm, skip):
        self.recon, self.kl, self.norm, self.skip = (torch.tensor(recon), torch.tensor(kl), torch.tensor(norm), skip)


def test_threshold_skips_and_nan_skips_are_counted_apart(tmp_path):
    cases = [_Case(6.0, 0.1, 900.0, True),  # a finite loss over the threshold: "grad"
             _Case(6.0, math.nan, math.nan, True),  # a NaN loss (its norm NaN): "nan"
             _Case(6.0, 0.1, 1.0, False),  # a plain step
             _Case(math.inf, 0.1, math.nan, False)]  # the rule off: a non-finite step applied
    recorder = StepRecorder(provenance=False)
    recorder.open(tmp_path / "events.jsonl", rank=0)

    def compute_loss(case):
        return case.recon, [], None, None, None, case.kl

    def gradient_skip(norm):
        return current.skip, float(current.skip)

    model = torch.nn.Linear(1, 1)
    for step, current in enumerate(cases):
        def train_step(model, ema_model, optimizer, inputs, step_n):
            recorder.compute_loss(compute_loss)(current)
            recorder.gradient_skip(gradient_skip)(current.norm)

        recorder.train_step(train_step)(model, None, None, None, step)
    recorder.close()
    logged = events.read(tmp_path).events
    assert [(e["skipped"], e["reason"], e["finite"]) for e in logged] == [
        (True, "grad", True), (True, "nan", False), (False, None, True), (False, None, False)]
    assert logged[0]["loss"] == pytest.approx(6.1 * math.log(2))  # nats/dim
    assert logged[1]["nonfinite"] == ["kl"] and logged[3]["nonfinite"] == ["recon"]
    counts = events.count(logged)
    assert (counts.grad_skips, counts.nan_steps, counts.skipped, counts.nonfinite_loss_steps) == (1, 1, 2, 2)


def test_what_the_launcher_refuses_it_says(tmp_path, data, capsys):
    clone = require_effvdvae()
    base = ["effvdvae", "--variant", "vanilla", "--cpu", "--max-steps", "1"]
    assert run_command.main([*base, "--out", str(tmp_path / "a"), "--", "optimizer.learning_rat=0.1"]) == 2
    assert "no key 'learning_rat' in [optimizer]" in capsys.readouterr().err
    assert run_command.main([*base, "--out", str(tmp_path / "b"), "--", "--lr", "0.1"]) == 2
    assert "section.key=value" in capsys.readouterr().err
    assert run_command.main([*base, "--out", str(tmp_path / "c"), "--", *tiny.TRAIN_ARGS]) == 2
    assert "pass --data DIR" in capsys.readouterr().err
    earlier = tmp_path / "e" / "logs-tiny"  # an attempt that left its archived config and no checkpoint
    config.write(config.base_config(clone), config.parse_overrides([*tiny.TRAIN_ARGS, "optimizer.learning_rate=0.5"]),
                 earlier).rename(earlier / "hparams-tiny.cfg")
    assert run_command.main([*base, "--out", str(tmp_path / "e"), "--data", str(data), "--", *tiny.TRAIN_ARGS]) == 2
    assert "config of an earlier attempt" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's error: --data is effvdvae's
        run_command.main(["vdvae", "--variant", "vanilla", "--out", str(tmp_path / "d"), "--data", str(data)])
    assert "--data is for `vaepatch run effvdvae`" in capsys.readouterr().err
