"""The launcher's own logic, without a clone: step recording, the __main__ guard, CLI errors, the report."""
import pytest
import torch

from vaepatch.runs import events
from vaepatch.runs.recorder import StopAtMaxSteps
from vaepatch.targets.vdvae import launch
from vaepatch.cli import main as cli


def _stats(elbo, grad_norm, skipped, distortion_nans=0, rate_nans=0):
    return dict(elbo=elbo, grad_norm=grad_norm, skipped_updates=skipped,
                distortion_nans=distortion_nans, rate_nans=rate_nans)


def _recorded(tmp_path, steps, max_steps=None, local=None):
    """Drive StepRecorder with fake upstream steps; ``local`` gives each rank-local loss."""
    path = tmp_path / "events.jsonl"
    with events.EventWriter(path, rank=0) as writer:
        recorder = launch.StepRecorder(writer, max_steps)
        for i, stats in enumerate(steps):
            def fake_step(H, x, t, vae, ema, opt, iterate, stats=stats, i=i):
                if local is not None:
                    reduce = recorder.stats_over_ranks(lambda d: d)
                    reduce({"elbo": torch.tensor(local[i], requires_grad=True)})
                return stats
            recorder.training_step(fake_step)(None, None, None, None, None, None, i)
    return events.read(path).events


def test_reasons_follow_vdvae_rule_with_inf_counted_as_nan(tmp_path):
    got = _recorded(tmp_path, [
        _stats(2.0, 10.0, 0),                                   # normal step
        _stats(float("nan"), float("nan"), 1, distortion_nans=1),  # NaN loss: upstream's own NaN skip
        _stats(float("inf"), float("inf"), 1),                  # inf loss: upstream skips only via grad norm
        _stats(3.0, 500.0, 1),                                  # finite loss, grad norm over threshold
        _stats(float("inf"), 1.0, 0),                           # skip_threshold -1: inf loss, not skipped
    ])
    assert [(e["skipped"], e["reason"], e["finite"]) for e in got] == [
        (False, None, True), (True, "nan", False), (True, "nan", False), (True, "grad", True), (False, None, False)]
    assert got[0]["loss"] == 2.0 and got[0]["grad_norm"] == 10.0
    assert got[2]["loss"] is None and got[2]["grad_norm"] is None
    assert all(e["time"] >= 0 for e in got)


def test_local_loss_is_this_ranks_own_not_the_average(tmp_path):
    # another rank's NaN makes the averaged loss NaN and the step skipped; this rank's loss was finite
    got = _recorded(tmp_path, [_stats(float("nan"), 5.0, 1, distortion_nans=0.5)], local=[1.5])
    assert got[0]["loss"] == 1.5 and got[0]["finite"] is True
    assert got[0]["skipped"] is True and got[0]["reason"] == "nan"


def test_max_steps_stops_before_running_the_step(tmp_path):
    ran = []
    with events.EventWriter(tmp_path / "e.jsonl") as writer:
        step = launch.StepRecorder(writer, max_steps=2).training_step(
            lambda *a: ran.append(a[-1]) or _stats(1.0, 1.0, 0))
        step(*[None] * 6, 0)
        step(*[None] * 6, 1)
        with pytest.raises(launch.StopAtMaxSteps):
            step(*[None] * 6, 2)
    assert ran == [0, 1]


def test_resumed_steps_are_not_logged_twice(tmp_path):
    path = tmp_path / "events.jsonl"
    with events.EventWriter(path) as writer:
        recorder = launch.StepRecorder(writer)
        for i in range(5):
            recorder.training_step(lambda *a: _stats(1.0, 1.0, 0))(*[None] * 6, i)
    with events.EventWriter(path) as writer:
        recorder = launch.StepRecorder(writer)
        for i in range(3, 8):  # a restore from the step-3 checkpoint re-runs 3 and 4
            recorder.training_step(lambda *a: _stats(2.0, 1.0, 0))(*[None] * 6, i)
        assert (recorder.logged, recorder.already_logged) == (3, 2)
    log = events.read(path)
    assert [e["step"] for e in log.events] == list(range(8)) and log.duplicates == 0


def test_train_script_loads_without_its_guard_firing(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("fired = []\ndef main():\n    fired.append(__name__)\n"
                      "if __name__ == '__main__':\n    main()\n    fired.append('guard')\n"
                      "if '__main__' == __name__:\n    fired.append('reversed guard')\n"
                      "if __name__ == 'other':\n    fired.append('not a guard')\n")
    module, guard = launch.load_script(script)
    assert module.fired == [] and module.__name__ == "__main__" and module.__file__ == str(script)
    module.main()
    assert module.fired == ["__main__"]
    exec(guard, module.__dict__)  # the guard's body alone, in the module's namespace
    assert module.fired == ["__main__", "__main__", "guard", "reversed guard"]


def test_train_script_errors_keep_the_script_line_numbers(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("x = 1\n\nif __name__ == '__main__':\n    y = 2\n    raise ValueError('line 5')\n")
    module, guard = launch.load_script(script)
    with pytest.raises(ValueError) as e:
        exec(guard, module.__dict__)
    assert e.traceback[-1].lineno + 1 == 5 and str(e.traceback[-1].path) == str(script)


def test_cli_rejects_unknown_variant_and_stray_args(capsys):
    assert cli(["run", "vdvae", "--variant", "upbounded7", "--out", "x"]) == 2
    assert "unknown variant" in capsys.readouterr().err.lower()
    with pytest.raises(SystemExit) as e:
        cli(["run", "vdvae", "--variant", "vanilla", "--out", "x", "--hps", "cifar10"])
    assert e.value.code == 2
    assert "go after `--`" in capsys.readouterr().err


def test_cli_names_a_missing_clone_and_the_fix(tmp_path, capsys):
    assert cli(["run", "vdvae", "--variant", "vanilla", "--out", str(tmp_path / "r"),
                "--upstream", str(tmp_path / "nowhere"), "--", "--hps", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "vaepatch fetch vdvae" in err


def test_run_fuses_on_a_gpu_where_compile_works_and_says_why(monkeypatch):
    from vaepatch.runs import prerun
    from vaepatch.variant import Variant

    patched, vanilla = Variant.parse("upbounded1"), Variant.parse("vanilla")
    monkeypatch.delenv("VAEPATCH_FUSE", raising=False)
    monkeypatch.setattr(prerun, "compile_works", lambda device: (True, ""))
    assert prerun.choose_fuse(None, cpu=False, variant=patched)[0] is True
    fuse, why = prerun.choose_fuse(None, cpu=True, variant=patched)
    assert fuse is False and "on CPU" in why  # CPU: eager unless asked
    assert prerun.choose_fuse(True, cpu=True, variant=patched) == (True, "fused (torch.compile), as asked (--fuse)")
    assert prerun.choose_fuse(None, cpu=False, variant=vanilla)[0] is False  # nothing to fuse
    monkeypatch.setattr(prerun, "compile_works", lambda device: (False, "RuntimeError: no Triton"))
    fuse, why = prerun.choose_fuse(None, cpu=False, variant=patched)
    assert fuse is False and "no Triton" in why
    assert prerun.choose_fuse(False, cpu=False, variant=patched)[0] is False  # --no-fuse
    monkeypatch.setenv("VAEPATCH_FUSE", "1")
    assert prerun.choose_fuse(None, cpu=True, variant=patched) == (
        True, "fused (torch.compile), as asked ($VAEPATCH_FUSE=1)")


def test_compile_works_reports_a_failure_instead_of_raising(monkeypatch):
    import torch

    from vaepatch.runs import prerun

    def broken(*a, **k):
        raise RuntimeError("Compiler: cc not found\nmore")

    monkeypatch.setattr(torch, "compile", broken)
    assert prerun.compile_works("cpu") == (False, "RuntimeError: Compiler: cc not found")


@pytest.mark.parametrize("ending, status", [(None, "completed"), (SystemExit(0), "completed"),
                                            (StopAtMaxSteps(40), "stopped at --max-steps 40"),
                                            (SystemExit(3), SystemExit), (ValueError("bad"), ValueError)])
def test_the_script_runs_as_its_own_main_and_its_ending_becomes_the_status(ending, status):
    import sys
    import types

    from vaepatch.runs.prerun import run_main

    seen = {}
    train = types.ModuleType("__main__")

    def main():
        seen.update(argv=list(sys.argv), main=sys.modules["__main__"])
        if ending is not None:
            raise ending

    train.main = main
    argv, real_main = list(sys.argv), sys.modules["__main__"]
    if isinstance(status, type):  # a crash or a failing exit() is the caller's to record, not swallowed
        with pytest.raises(status):
            run_main(train, ["train.py", "--x"])
    else:
        assert run_main(train, ["train.py", "--x"]) == status
    assert seen == {"argv": ["train.py", "--x"], "main": train}
    assert sys.argv == argv and sys.modules["__main__"] is real_main
