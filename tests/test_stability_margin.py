"""`vaepatch bench stability-margin`: the margin rule on synthetic outcomes, outcomes read from
events, resume, and --quick end to end on a real clone (skipped, with the reason, without one)."""
import json

import pytest

from vaepatch.bench import stability_margin as sm
from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest
from tests.vdvae_support import vdvae_clone

LRS = [0.001, 0.003, 0.01, 0.03]


def _cells(passes: dict) -> dict:
    """``passes[name]`` = per lr, how many of 3 seeds pass."""
    return {(name, lr): [{"passed": i < n} for i in range(3)] for name, row in passes.items()
            for lr, n in zip(LRS, row)}


def test_margin_is_the_largest_rate_below_the_first_failing_one():
    result = sm.margins(_cells({"vanilla": [3, 3, 2, 0], "a": [3, 3, 3, 3], "b": [3, 0, 3, 3], "c": [0, 0, 0, 0]}),
                        LRS, ["vanilla", "a", "b", "c"])
    assert result["vanilla"] == {"margin": 0.003, "first_failing": 0.01, "passes_above_failure": False, "ratio": 1.0}
    assert result["a"]["margin"] == 0.03 and result["a"]["first_failing"] is None and result["a"]["ratio"] == 10
    # passing again above the first failure does not extend the margin, but is flagged
    assert result["b"]["margin"] == 0.001 and result["b"]["passes_above_failure"] and result["b"]["ratio"] == pytest.approx(1 / 3)
    assert result["c"]["margin"] is None and result["c"]["ratio"] is None


def test_log_grid():
    assert sm.log_grid("0.001:0.1:3") == [0.001, 0.01, 0.1]
    assert sm.log_grid("0.03,0.01") == [0.01, 0.03]
    for bad in ("0.1:0.01:3", "0.01:0.1:1", "-1,2"):
        with pytest.raises(ValueError):
            sm.log_grid(bad)


def _write_run(run_dir, status, plan):
    run_dir.mkdir(parents=True)
    run_manifest.write(run_dir / "run.json", {"variant": "vanilla", "variant_spec": "vanilla", "status": status})
    with events.EventWriter(run_dir / "events.jsonl") as writer:
        for step, (loss, skipped, reason) in enumerate(plan):
            writer.write(step, loss, 1.0, skipped, reason, 0.1)


def test_outcome_reads_failures_and_early_stops_from_the_events(tmp_path):
    _write_run(tmp_path / "ok", "stopped at --max-steps 3", [(1.0, False, None)] * 3)
    _write_run(tmp_path / "nan", "stopped: non-finite loss at step 1", [(1.0, False, None), (None, True, "nan")])
    _write_run(tmp_path / "short", "stopped at --max-steps 2", [(1.0, False, None)] * 2)
    _write_run(tmp_path / "dead", "stopped: stalled since step 1 (2 steps in a row without an update)",
               [(1.0, False, None), (1.0, True, "grad"), (1.0, True, "grad")])
    ok, nan, short, dead = (sm.outcome(tmp_path / n, steps=3) for n in ("ok", "nan", "short", "dead"))
    assert ok["passed"] and ok["first_fail_step"] is None
    assert not nan["passed"] and (nan["nan_steps"], nan["skips"], nan["first_fail_step"]) == (1, 0, 1)
    assert nan["first_failure"] == "step 1: loss non-finite"
    assert not short["passed"]  # did not run all its steps
    assert not dead["passed"] and (dead["skips"], dead["dead"], dead["first_fail_step"]) == (2, 2, 1)


def test_rerun_skips_finished_runs_and_restarts_interrupted_ones(tmp_path, monkeypatch):
    import vaepatch.targets.vdvae.tiny as tiny

    monkeypatch.setattr(tiny, "make_data", lambda dest, steps: dest)
    names, seeds = ["vanilla"], [0, 1]
    dirs = sm._run_dirs(tmp_path, names, [0.01], seeds)
    _write_run(dirs[("vanilla", 0.01, 0)], "stopped at --max-steps 1", [(1.0, False, None)])
    _write_run(dirs[("vanilla", 0.01, 1)], "running", [(1.0, False, None)])  # killed mid-run
    launched = []

    def launch(job):
        command, log = job
        run_dir = log.parent
        assert not (run_dir / "events.jsonl").exists()  # the interrupted attempt was cleared
        launched.append(command)
        _write_run(run_dir / "fresh", "x", [])  # the launcher would write here; keep the folder non-empty
        return 0

    cells = sm.run_grid("vdvae", tmp_path, names, [0.01], seeds, steps=1, dead=5, jobs=1, launch=launch)
    assert len(launched) == 1 and "--seed" in launched[0] and launched[0][launched[0].index("--seed") + 1] == "1"
    assert "--stop-at-nonfinite" in launched[0] and launched[0][launched[0].index("--stop-when-stalled") + 1] == "5"
    assert [run["passed"] for run in cells[("vanilla", 0.01)]] == [True, False]


CLONE, WHY_NOT = vdvae_clone()


@pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")
def test_quick_grid_end_to_end_on_the_real_vdvae(tmp_path):
    pytest.importorskip("mpi4py")
    out = tmp_path / "m"
    assert sm.main(["--quick", "--out", str(out)]) == 0
    data = json.loads((out / "margin.json").read_text())
    assert data["meta"]["variants"] == ["vanilla", "upbounded1"] and len(data["cells"]) == 4
    for cell in data["cells"]:
        (run,) = cell["runs"]
        assert run["steps"] == 4 and run["status"].startswith("stopped")
        log = events.read(run["run"]).events
        assert all(isinstance(e["kl"], float) and "posterior" in e["scale"] for e in log)
    assert (out / "margin.png").stat().st_size > 1000 and "| `vanilla` |" in (out / "margin.md").read_text()
    before = (out / "runs" / "vanilla" / "lr0.001" / "seed0" / "events.jsonl").stat().st_mtime
    assert sm.main(["--quick", "--out", str(out)]) == 0  # resumed: every run was finished
    assert (out / "runs" / "vanilla" / "lr0.001" / "seed0" / "events.jsonl").stat().st_mtime == before


def test_a_finite_loss_far_above_the_first_steps_fails_the_run(tmp_path):
    """NVAE has no high-gradient skip: a loss that climbs 1e20-fold but stays finite must not pass."""
    _write_run(tmp_path / "up", "stopped at --max-steps 4", [(2e4, False, None), (1.9e4, False, None),
                                                            (8.5e21, False, None), (1e3, False, None)])
    _write_run(tmp_path / "wobble", "stopped at --max-steps 4", [(2e4, False, None), (1.9e5, False, None),
                                                                (1.5e4, False, None), (1e4, False, None)])
    up, wobble = sm.outcome(tmp_path / "up", steps=4), sm.outcome(tmp_path / "wobble", steps=4)
    assert not up["passed"] and up["diverged_step"] == 2 and up["first_fail_step"] == 2
    assert up["first_failure"] == "step 2: loss diverged (8.5e+21, 4.25e+17x the first step's)"  # no parts logged
    assert wobble["passed"] and wobble["diverged_step"] is None  # 9.5x the first loss: under the default 10x
    assert not sm.outcome(tmp_path / "wobble", steps=4, diverge=5)["passed"]
    # a NaN before the divergence stays the first failure
    _write_run(tmp_path / "nan", "stopped", [(2e4, False, None), (None, True, "nan"), (9e9, False, None)])
    nan = sm.outcome(tmp_path / "nan", steps=3)
    assert nan["first_fail_step"] == 1 and nan["first_failure"].startswith("step 1: loss non-finite")


def test_a_cell_read_before_its_runs_exist_says_not_run_rather_than_failed(tmp_path):
    (cell,) = sm.collect(tmp_path, ["vanilla"], [0.01], [0, 1], steps=5).values()
    assert [run["status"] for run in cell] == ["missing", "missing"]
    assert sm._cell_text(cell) == "2/2 (2 not run yet)"


def test_a_divergence_says_which_part_of_the_loss_and_which_scales(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    run_manifest.write(run / "run.json", {"variant": "vanilla", "variant_spec": "vanilla", "status": "stopped"})
    scale = {"posterior": {"raw": [-4.0, 5.0], "log_sigma": [-3.79, 4.82]}, "prior": {"raw": [-4.0, 5.0], "log_sigma": [-3.84, 4.74]}}
    with events.EventWriter(run / "events.jsonl") as writer:
        writer.write(0, 1.9e4, 1.0, False, None, 0.1, kl=108.0, recon=1.9e4)
        writer.write(1, 3.83e5, 1.0, False, None, 0.1, kl=1.4e6, recon=1.93e4, scale=scale)
    assert sm.outcome(run, steps=2)["first_failure"] == (
        "step 1: loss diverged (3.83e+05, 20.2x the first step's): kl 1.4e+06, recon 1.93e+04; "
        "posterior log sigma -3.79..4.82, prior log sigma -3.84..4.74")
