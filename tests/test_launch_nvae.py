"""The NVAE launcher's step recording without a clone: NVAE's loop shape (data queue, autocast
GradScaler scale/step/update) driven on a toy model with a real torch GradScaler, on CPU."""
import math
import subprocess
from pathlib import Path

import pytest
import torch

from vaepatch.runs import events
from vaepatch.cli import main as cli
from vaepatch.runs.recorder import StopAtMaxSteps
from vaepatch.targets.nvae.launch import StepRecorder, recording_scaler


def _loop(recorder, scaler, model, optimizer, batches, global_step=0, poison=None):
    """What NVAE's train() does per step, on a linear model: one call of the wrapped train()."""
    def train(queue, model, optimizer, grad_scalar, global_step):
        for step, x in enumerate(queue):
            optimizer.zero_grad()
            loss = model(x).pow(2).mean()
            if poison is not None:
                loss = poison(global_step, loss)
            grad_scalar.scale(loss).backward()
            grad_scalar.step(optimizer)
            grad_scalar.update()
            global_step += 1
        return global_step
    return recorder.train(train)(batches, model, optimizer, scaler, global_step)


def _setup(tmp_path, enabled, skip_nonfinite=False, max_steps=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = StepRecorder(max_steps=max_steps, skip_nonfinite=skip_nonfinite)
    recorder.open(tmp_path / "events.jsonl", rank=0)
    scaler = recording_scaler(torch.amp.GradScaler, recorder)("cpu", init_scale=2.0 ** 10, enabled=enabled)
    return model, optimizer, recorder, scaler


BATCHES = [torch.full((4, 3), float(i + 1)) for i in range(4)]


def _expected_norm(model, x):
    model.zero_grad()
    model(x).pow(2).mean().backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))


@pytest.mark.parametrize("enabled", [False, True])
def test_one_event_per_step_with_the_loss_and_unscaled_grad_norm(tmp_path, enabled):
    model, optimizer, recorder, scaler = _setup(tmp_path, enabled)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    expected = []
    for x in BATCHES:  # the same steps without any scaler: what the events must say
        loss = float(reference(x).pow(2).mean().detach())
        expected.append((loss, _expected_norm(reference, x)))
        ref_optimizer.step()
    assert _loop(recorder, scaler, model, optimizer, BATCHES, global_step=7) == 11
    recorder.close()
    got = events.read(tmp_path).events
    assert [e["step"] for e in got] == [7, 8, 9, 10]  # numbering continues NVAE's global_step
    for e, (loss, norm) in zip(got, expected):
        assert e["loss"] == pytest.approx(loss, rel=1e-5) and e["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert not e["skipped"] and e["reason"] is None and e["time"] >= 0
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q)


def test_amp_skip_of_inf_gradients_is_logged_as_amp(tmp_path):
    model, optimizer, recorder, scaler = _setup(tmp_path, enabled=True)
    weights = []

    def poison(global_step, loss):
        weights.append(model.weight.detach().clone())
        if global_step == 1:
            model.weight.register_hook(lambda g: torch.full_like(g, math.inf))  # finite loss, inf gradient
        return loss

    _loop(recorder, scaler, model, optimizer, BATCHES[:3], poison=poison)
    recorder.close()
    got = events.read(tmp_path).events
    assert [(e["skipped"], e["reason"], e["finite"]) for e in got] == [
        (False, None, True), (True, "amp", True), (True, "amp", True)]  # the hook stays: every later step inf
    assert got[1]["grad_norm"] is None  # inf, written as null
    assert torch.equal(model.weight.detach(), weights[1])  # AMP did skip: weights as before step 1
    assert scaler.get_scale() == 2.0 ** 10 / 4  # backed off twice


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("guard", [False, True])
def test_nonfinite_loss_is_nan_and_the_guard_skips_it(tmp_path, enabled, guard):
    model, optimizer, recorder, scaler = _setup(tmp_path, enabled, skip_nonfinite=guard)
    before = [p.detach().clone() for p in model.parameters()]

    def poison(global_step, loss):
        return loss * math.nan if global_step == 0 else loss

    _loop(recorder, scaler, model, optimizer, BATCHES[:1], poison=poison)
    recorder.close()
    (e,) = events.read(tmp_path).events
    assert e["loss"] is None and e["finite"] is False
    applied = not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    if guard or enabled:  # the guard skips; AMP skips because the NaN reaches the gradients
        assert (e["skipped"], e["reason"], applied) == (True, "nan", False)
    else:  # NVAE's own behaviour on CPU: the NaN update goes in
        assert (e["skipped"], e["reason"], applied) == (False, None, True)
        assert any(torch.isnan(p).any() for p in model.parameters())


def test_max_steps_stops_before_fetching_the_next_step(tmp_path):
    model, optimizer, recorder, scaler = _setup(tmp_path, enabled=False, max_steps=6)
    with pytest.raises(StopAtMaxSteps):
        _loop(recorder, scaler, model, optimizer, BATCHES, global_step=3)
    recorder.close()
    assert [e["step"] for e in events.read(tmp_path).events] == [3, 4, 5]


def test_restart_does_not_log_a_step_twice(tmp_path):
    for start in (0, 2):  # a --cont_training from the step-2 checkpoint re-runs steps 2 and 3
        model, optimizer, recorder, scaler = _setup(tmp_path, enabled=False)
        _loop(recorder, scaler, model, optimizer, BATCHES, global_step=start)
        recorder.close()
    assert (recorder.logged, recorder.already_logged) == (2, 2)
    log = events.read(tmp_path)
    assert [e["step"] for e in log.events] == [0, 1, 2, 3, 4, 5] and log.duplicates == 0


def test_cli_keeps_each_flag_to_its_target(capsys):
    with pytest.raises(SystemExit):
        cli(["run", "vdvae", "--variant", "vanilla", "--out", "x", "--skip-nonfinite"])
    assert "VDVAE already skips non-finite losses itself" in capsys.readouterr().err


def test_cli_names_a_missing_nvae_clone_and_a_bad_variant(tmp_path, capsys):
    assert cli(["run", "nvae", "--variant", "vanilla", "--out", str(tmp_path / "r"),
                "--upstream", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err
    assert cli(["run", "nvae", "--variant", "explin,ou=1.5x5", "--out", str(tmp_path / "r")]) == 2
    assert "rho" in capsys.readouterr().err


def test_script_without_data_says_where_to_get_it(tmp_path):
    result = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "run_scripts" / "nvae_cifar.sh"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cifar-10-python.tar.gz" in result.stderr and "--smoke" in result.stderr


@pytest.mark.parametrize("variants, expected", [
    ("vanilla,upbounded1", ["vanilla", "upbounded1"]),
    ("vanilla;upbounded1,ou=0.9x5;explin-cst1", ["vanilla", "upbounded1,ou=0.9x5", "explin-cst1"]),
    ("upbounded1,ou=0.9x5;", ["upbounded1,ou=0.9x5"]),  # one spec with commas (the Slurm template's form)
])
def test_run_scripts_split_variants_on_semicolons_when_a_spec_has_commas(tmp_path, variants, expected):
    lib = Path(__file__).resolve().parents[1] / "run_scripts" / "lib.sh"
    script = (f'. "{lib}"; VARIANTS="{variants}" SEEDS=0,1 OUT="{tmp_path}"; '
              'show() { echo "$1|$2|$3"; }; for_each_run show')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"{v}|{s}|{v}-seed{s}" for v in expected for s in (0, 1)]
