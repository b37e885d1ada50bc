"""`vaepatch.runs.verdict`: a run is judged by where it ends, on synthetic event files."""
import math
import statistics

import pytest

from vaepatch.runs import events, verdict
from vaepatch.runs import manifest as run_manifest


def _run(tmp_path, name, losses, status="stopped at --max-steps", skipped=(), parts=None):
    """A run folder whose step i logged ``losses[i]`` (None: non-finite); ``skipped`` steps were grad skips."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    run_manifest.write(run_dir / "run.json", {"variant": "vanilla", "variant_spec": "vanilla", "status": status})
    with events.EventWriter(run_dir / "events.jsonl") as writer:
        for step, loss in enumerate(losses):
            reason = "nan" if loss is None else ("grad" if step in skipped else None)
            extra = parts(step, loss) if parts and loss is not None else {}
            writer.write(step, loss, 1.0, reason is not None, reason, 0.1, **extra)
    return verdict.judge_dir(run_dir, steps=len(losses))


def _training(n=100, start=6.0, end=4.0):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def test_a_spike_the_run_recovers_from_passes_and_is_counted(tmp_path):
    losses = _training()
    losses[30], losses[31] = 2.5e6, 80.0  # VDVAE right after its warm-up, without the skip rule
    run = _run(tmp_path, "spike", losses)
    assert run["verdict"] == "passed" and run["passed"]
    assert run["spikes"]["count"] == 2 and run["spikes"]["max_step"] == 30
    assert run["spikes"]["max_ratio"] == pytest.approx(2.5e6 / statistics.median(losses[:30]))
    assert run["end_nelbo"] == pytest.approx(statistics.median(losses[90:]))


def test_a_nan_step_the_upstream_skips_is_counted_not_failed(tmp_path):
    """VDVAE never applies a NaN step and trains on: the paper's vanilla runs had 13 ± 3 and finished."""
    losses = _training()
    for step in (50, 51, 70):
        losses[step] = None
    run = _run(tmp_path, "nan", losses)
    assert run["verdict"] == "passed" and run["passed"]
    assert run["nan_steps"] == run["nonfinite_loss_steps"] == 3 and run["first_nonfinite_loss_step"] == 50
    assert run["applied_share"] == pytest.approx(97 / 100) and run["end_applied_share"] == 1.0


def test_a_run_that_nans_on_most_of_its_last_tenth_fails_without_a_stall(tmp_path):
    """The issue's seed 0 at lr 0.02: NaN on ~96% of its last steps, never 100 in a row; its finite
    steps look trained."""
    losses = _training(200)
    for step in range(180, 200):
        if step % 7:  # 17 of the last 20 NaN, the longest streak 6
            losses[step] = None
    run = _run(tmp_path, "mostly", losses)
    assert run["verdict"] == "mostly skipped" and not run["passed"]
    assert run["end_applied_share"] == pytest.approx(3 / 20) and run["longest_skip_streak"] == 6
    half = _training(200)
    for step in range(180, 190):  # exactly half of the last tenth not applied: still training
        half[step] = None
    assert _run(tmp_path, "half", half)["verdict"] == "passed"


def test_non_finite_weights_at_the_end_fail_a_run(tmp_path):
    run_dir = tmp_path / "nanweights"
    _run(tmp_path, "nanweights", _training())
    manifest = run_manifest.read(run_dir / "run.json")
    run_manifest.write(run_dir / "run.json", {**manifest, "weights_finite": False})
    assert verdict.judge_dir(run_dir, steps=100)["verdict"] == "non-finite weights"
    run_manifest.write(run_dir / "run.json", {**manifest, "weights_finite": True})
    assert verdict.judge_dir(run_dir, steps=100)["verdict"] == "passed"


def test_a_run_stopped_at_its_first_nan_by_the_opt_in_shortcut_is_non_finite(tmp_path):
    losses = _training()
    losses[50] = None
    run = _run(tmp_path, "stopped", losses[:51], status="stopped: non-finite loss at step 50")
    assert run["verdict"] == "non-finite" and not run["passed"]


def test_a_run_records_its_own_wall_time_and_machine(tmp_path):
    run_dir = tmp_path / "timed"
    _run(tmp_path, "timed", _training())
    manifest = run_manifest.read(run_dir / "run.json")
    machine = run_manifest.machine()
    run_manifest.write(run_dir / "run.json", {**manifest, "started": "2026-12-06T10:00:00+00:00",
                                              "ended": "2026-12-06T10:03:05+00:00", "machine": machine})
    run = verdict.judge_dir(run_dir, steps=100)
    assert run["wall_seconds"] == 185.0 and run["machine"] == machine and machine["cpus"] >= 1


def test_a_stalled_run_fails(tmp_path):
    run = _run(tmp_path, "dead", _training(), status="stopped: stalled since step 60 (40 steps in a row without an update)",
               skipped=range(60, 100))
    assert run["verdict"] == "stalled" and run["grad_skips"] == 40 and run["skip_streak"] == 40
    # the same skips with updates after them: the run came back, only counted
    recovered = _run(tmp_path, "back", _training(), skipped=range(20, 60))
    assert recovered["verdict"] == "passed" and recovered["grad_skips"] == 40


def test_a_run_that_ends_above_its_start_fails_as_untrained(tmp_path):
    up = _run(tmp_path, "up", [2e4, 1.9e4] + [1e9] * 98)  # NVAE at lr 1: finite, and far above where it began
    assert up["verdict"] == "untrained" and up["end_nelbo"] == pytest.approx(1e9)
    flat = _run(tmp_path, "flat", [6.0] * 100)
    assert flat["verdict"] == "untrained"  # not below the first step's: did not train


def test_crashed_and_short_runs_fail(tmp_path):
    assert _run(tmp_path, "crash", _training(), status="crashed: RuntimeError: x")["verdict"] == "crashed"
    run_dir = tmp_path / "short"
    _run(tmp_path, "short", _training(50))
    assert verdict.judge_dir(run_dir, steps=100)["verdict"] == "incomplete"
    assert verdict.judge_dir(tmp_path / "absent", steps=100)["verdict"] == "not run"


def test_the_verdict_uses_the_unweighted_nelbo_where_the_event_has_its_parts(tmp_path):
    """NVAE anneals the KL's weight: its logged loss rises from ~recon while recon + KL falls."""
    n = 100

    def parts(step, loss):
        kl = 3000.0 - 20 * step  # the KL falls...
        return {"kl": kl, "recon": 18000.0 - 10 * step}

    weighted = [(18000.0 - 10 * s) + min(1.0, s / 30) * (3000.0 - 20 * s) for s in range(n)]  # ...its weight rises
    run = _run(tmp_path, "annealed", weighted, parts=parts)
    assert weighted[-1] > weighted[0]  # by the logged loss, this run would look untrained
    assert run["verdict"] == "passed"
    assert run["first_nelbo"] == pytest.approx(21000.0) and run["end_nelbo"] < run["first_nelbo"]


def test_spikes_need_history_and_stay_out_of_the_median():
    points = [(i, v, False) for i, v in enumerate([100.0, 5.0, 5.0, 5.0, 5.0, 5.0, 60.0, 60.0, 5.0, None, 4.0])]
    s = verdict.spikes(points)
    # step 0's 100 has no history (not a spike); 60 is 12x the median 5; the second 60 too (spikes stay out)
    assert s == {"count": 2, "max_ratio": pytest.approx(12.0), "max_step": 6}
    assert verdict.spikes(points, factor=20.0)["count"] == 0


def test_nelbo_of_an_event():
    base = {"loss": 5.0, "finite": True}
    assert verdict.nelbo(base) == 5.0
    assert verdict.nelbo({**base, "kl": 1.0, "recon": 2.5}) == 3.5
    assert verdict.nelbo({**base, "finite": False, "loss": None, "kl": 1.0, "recon": 2.0}) is None
    assert verdict.nelbo({**base, "kl": math.inf, "recon": 2.0}) is None


def test_a_spike_in_the_last_tenth_does_not_decide_but_a_ruined_end_does(tmp_path):
    losses = _training()
    losses[95] = 1e16  # one step among the last ten, the run back at its loss the step after
    assert _run(tmp_path, "late-spike", losses)["verdict"] == "passed"
    ruined = _training()
    ruined[94:] = [1e9] * 6  # more than half of the last tenth
    run = _run(tmp_path, "ruined", ruined)
    assert run["verdict"] == "untrained" and run["end_nelbo"] == 1e9
