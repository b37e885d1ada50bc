"""Failure provenance on the real openai/vdvae: a fault injected into one known block shows up in the
event's ``where``; the observers leave a vanilla run bit-identical; the launcher stalls, stops, and
refuses a missing dataset with a message. Needs a clone; skipped (with the reason) without one."""
import copy
import math
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vaepatch
from vaepatch import cifar_format
from vaepatch.runs.prerun import free_port
from vaepatch.runs import events
from tests.vdvae_support import require_vdvae, vdvae_clone

CLONE, WHY_NOT = vdvae_clone()
pytestmark = pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")
REPO = Path(__file__).resolve().parents[1]
FAULT_BLOCK, FAULT_STEP = 3, 2


@pytest.fixture(scope="module")
def upstream_train():
    """Upstream's own train.py definitions (training_step, get_cpu_stats_over_ranks), CPU shims on."""
    require_vdvae()
    from vaepatch.runs.script import load_script
    from vaepatch.targets.vdvae.shims import install

    shims = install(cpu=True)
    try:
        train, _ = load_script(CLONE / "train.py")
        yield train
    finally:
        shims.revert()


def _run_steps(tmp_path, train, variant, steps, fault=None, provenance=True):
    """``steps`` of upstream's training_step on the tiny model through the step recorder; the events."""
    from vaepatch.targets.vdvae.patch import UPSTREAM_SCALE
    from vaepatch.targets.vdvae.recorder import StepRecorder
    from vaepatch.targets.vdvae.tiny import batch, tiny_vae

    handle = vaepatch.apply(variant, target="vdvae")
    try:
        H, model = tiny_vae(seed=0)
        ema = copy.deepcopy(model)
        H.ema_rate = torch.as_tensor(H.ema_rate)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, target = batch(H.n_batch, seed=0)
        sides = (handle.variant.posterior or UPSTREAM_SCALE, handle.variant.prior or UPSTREAM_SCALE)
        recorder = StepRecorder(max_steps=None, scales=sides, provenance=provenance)
        recorder.open(tmp_path / "events.jsonl", rank=0)
        step_fn = recorder.training_step(train.training_step)
        saved = train.get_cpu_stats_over_ranks
        train.get_cpu_stats_over_ranks = recorder.stats_over_ranks(saved)
        losses = []
        try:
            for i in range(steps):
                hook = fault(model, i) if fault else None
                torch.manual_seed(100 + i)
                losses.append(step_fn(H, x, target, model, ema, optimizer, i)["elbo"])
                if hook is not None:
                    hook.remove()
        finally:
            train.get_cpu_stats_over_ranks = saved
            recorder.close()
        return losses, events.read(tmp_path).events
    finally:
        vaepatch.revert()


def _prior_far_negative(model, step):
    """At FAULT_STEP, block FAULT_BLOCK's prior head outputs a raw scale of -100 everywhere."""
    if step != FAULT_STEP:
        return None
    block = model.decoder.dec_blocks[FAULT_BLOCK]
    z = block.zdim

    def hook(module, inputs, out):
        out = out.clone()
        out[:, z:2 * z] = -100.0
        return out

    return block.prior.register_forward_hook(hook, prepend=True)  # before the watch: it sees the fault


@pytest.mark.parametrize("variant", ["vanilla", "upbounded1"])
def test_injected_prior_underflow_is_named_in_the_event(tmp_path, upstream_train, variant, one_thread):
    _, log = _run_steps(tmp_path, upstream_train, variant, FAULT_STEP + 2, fault=_prior_far_negative)
    good, bad = log[FAULT_STEP - 1], log[FAULT_STEP]
    assert good["finite"] and "where" not in good and good["kl"] > 0 and good["recon"] > 0
    assert good["loss"] == pytest.approx(good["kl"] + good["recon"], rel=1e-5)  # VDVAE's elbo = rate + distortion
    assert not bad["finite"] and bad["skipped"] and bad["reason"] == "nan" and bad["nonfinite"] == ["kl"]
    block = bad["where"]
    assert block["group"] == FAULT_BLOCK and block["label"].startswith(f"block {FAULT_BLOCK} (")
    assert block["prior"]["raw"] == [-100.0, -100.0] and "prior sigma underflow" in block["cause"]
    assert block["groups_nonfinite"] == 1
    assert block["grad_top"] and all(len(entry) == 3 for entry in block["grad_top"])
    assert events.count(log).nonfinite_origins == {f"kl non-finite at {block['label']}: {block['cause']}": 1}


def _prior_far_negative_at(steps):
    """The same fault as :func:`_prior_far_negative`, at every step in ``steps``."""
    def fault(model, step):
        if step not in steps:
            return None
        return _prior_far_negative(model, FAULT_STEP)
    return fault


def test_a_real_run_with_nan_steps_goes_on_and_is_judged_by_where_it_ends(tmp_path, upstream_train, one_thread):
    """Upstream's training_step skips a NaN step and trains on: the NaN steps are counted, the weights stay
    finite, and the run passes; NaN on most of its last tenth instead fails it, though no step stalled it."""
    from vaepatch.runs import verdict

    steps = 20
    losses, log = _run_steps(tmp_path / "few", upstream_train, "vanilla", steps,
                             fault=_prior_far_negative_at({3, 4, 9}))
    assert [e["step"] for e in log if e["reason"] == "nan"] == [3, 4, 9]
    assert all(math.isfinite(v) for i, v in enumerate(losses) if i not in (3, 4, 9))  # the NaN was never applied
    run = verdict.judge(log, "stopped at --max-steps", steps)
    assert run["verdict"] == "passed" and run["nan_steps"] == 3 and run["end_nelbo"] < run["first_nelbo"]
    _, ruined = _run_steps(tmp_path / "end", upstream_train, "vanilla", 10, fault=_prior_far_negative_at({9}))
    late = verdict.judge(ruined, "stopped at --max-steps", 10)  # its last tenth is its last step, a NaN
    assert late["verdict"] == "mostly skipped" and late["end_applied_share"] == 0.0 and late["nan_steps"] == 1


def test_observers_leave_a_vanilla_run_bit_identical(tmp_path, upstream_train, one_thread):
    watched, _ = _run_steps(tmp_path / "a", upstream_train, "vanilla", 4, provenance=True)
    plain, _ = _run_steps(tmp_path / "b", upstream_train, "vanilla", 4, provenance=False)
    assert watched == plain  # exact: the hooks only read


def _launch(tmp_path, data, *launcher, train_args=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "vaepatch", "run", "vdvae", "--variant", "vanilla", "--out", str(tmp_path / "run"),
               "--cpu", "--upstream", str(CLONE), *launcher, "--", "--hps", "cifar10", "--data_root", str(data),
               "--width", "16", "--zdim", "4", "--n_batch", "4", "--dec_blocks", "1x1,4m1,8m4,16m8,32m16",
               "--enc_blocks", "32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1", "--save_dir", str(tmp_path / "vdvae"),
               "--port", str(free_port()), *train_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_a_run_that_skips_every_step_is_stalled_and_stops(tmp_path):
    pytest.importorskip("mpi4py")
    data = cifar_format.make(tmp_path / "data", n_train=5040, n_test=8)
    result = _launch(tmp_path, data, "--stop-when-stalled", "4", "--max-steps", "50",
                     train_args=["--skip_threshold", "1e-9"])  # every grad norm is above it: every update skipped
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run stalled: no update since step 0 (4 steps in a row" in result.stderr
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["stalled_since"] == 0 and manifest["status"].startswith("stopped: stalled since step 0")
    log = events.read(tmp_path / "run").events
    assert [e["step"] for e in log] == [0, 1, 2, 3] and all(e["reason"] == "grad" for e in log)
    assert all(e["where"]["label"].startswith("block ") and "cause" in e["where"] for e in log)


def test_missing_dataset_is_named_before_upstream_starts(tmp_path):
    pytest.importorskip("mpi4py")
    empty = tmp_path / "nothing"
    empty.mkdir()
    result = _launch(tmp_path, empty)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing cifar-10-batches-py/data_batch_1" in result.stderr and "test_batch" in result.stderr
    assert cifar_format.CIFAR_SOURCE in result.stderr and "vaepatch make-data" in result.stderr
    assert not (tmp_path / "run" / "run.json").exists()
