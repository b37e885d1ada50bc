"""`vaepatch bench stability-margin`: the margin rule with cells not run, the search that runs only the
deciding cells, the skip policies on the launcher's command line, resume, and --quick end to end on a
real clone (skipped, with the reason, without one)."""
import json
from pathlib import Path

import pytest

from vaepatch.bench import margin as sm
from vaepatch.bench.margin import report
from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest
from tests.vdvae_support import vdvae_clone

LRS = [0.001, 0.003, 0.01, 0.03]


def _states(rows: dict) -> dict:
    """``rows[name]`` = per lr, True / False / None (not run)."""
    return {(name, lr): ok for name, row in rows.items() for lr, ok in zip(LRS, row)}


def test_margin_is_the_largest_passing_rate_below_the_first_failing_one():
    result = report.margins(_states({"vanilla": [True, True, False, False], "a": [True, True, True, True],
                                     "b": [True, False, True, True], "c": [False, False, False, False]}),
                            LRS, ["vanilla", "a", "b", "c"])
    assert result["vanilla"] == {"margin": 0.003, "first_failing": 0.01, "settled": True,
                                 "passes_above_failure": False, "ratio": 1.0}
    assert result["a"]["margin"] == 0.03 and result["a"]["first_failing"] is None and result["a"]["ratio"] == 10
    assert result["a"]["settled"]  # the grid's top
    # passing again above the first failure does not extend the margin, but is flagged
    assert result["b"]["margin"] == 0.001 and result["b"]["passes_above_failure"] and result["b"]["ratio"] == pytest.approx(1 / 3)
    assert result["c"]["margin"] is None and result["c"]["ratio"] is None and result["c"]["settled"]


def test_a_margin_at_the_grids_top_reads_as_a_lower_bound():
    result = report.margins(_states({"vanilla": [True, True, False, False], "a": [True, True, True, True]}),
                            LRS, ["vanilla", "a"])
    not_run = {(name, lr): {"state": None} for name in ("vanilla", "a") for lr in LRS}
    assert report._margin_cells(result["a"], not_run, "a", 0.003)[0] == "≥ 0.03 (the grid's top)"
    assert report._margin_cells(result["vanilla"], not_run, "vanilla", 0.003)[0] == "0.003"


def test_cells_not_run_are_unknown_never_failures():
    """A grid read before it finished: a rate not run yet neither fails nor ends the margin as a failure."""
    result = report.margins(_states({"vanilla": [True, None, None, None], "d": [None, True, None, False],
                                     "e": [None, None, None, None]}), LRS, ["vanilla", "d", "e"])
    assert result["vanilla"] == {"margin": 0.001, "first_failing": None, "settled": False,
                                 "passes_above_failure": False, "ratio": 1.0}
    # 0.003 passed, 0.01 not run, 0.03 failed: the margin is 0.003 so far, not settled
    assert result["d"]["margin"] == 0.003 and result["d"]["first_failing"] == 0.03 and not result["d"]["settled"]
    assert result["e"]["margin"] is None and not result["e"]["settled"]


def _run(**over):
    base = {"verdict": "passed", "passed": True, "end_nelbo": 4.0, "grad_skips": 0, "amp_skips": 0,
            "nonfinite_loss_steps": 0, "spikes": {"count": 0, "max_ratio": None, "max_step": None}}
    return {**base, **over}


def test_a_cell_is_unknown_while_a_seed_is_missing_and_failed_once_one_fails():
    missing = _run(verdict="not run", passed=False, end_nelbo=None)
    assert report.cell_state([_run(), missing]) is None
    assert report.cell_state([_run(verdict="non-finite", passed=False), missing]) is False
    assert report.cell_state([_run(), _run()]) is True
    summary = report.cell_summary([_run(), missing])
    assert (summary["failed"], summary["not_run"]) == (0, 1)
    assert report._cell_text(summary) == "1 of 2 run, passed so far"  # not "1/2 failed"
    assert report._cell_text(report.cell_summary([missing, missing])) == "not run"


def test_cell_summary_reports_end_nelbo_of_passing_runs_and_spikes():
    spiky = {"count": 3, "max_ratio": 4e5, "max_step": 114}
    runs = [_run(end_nelbo=4.5, spikes=spiky), _run(end_nelbo=4.7), _run(verdict="untrained", passed=False, end_nelbo=9.0)]
    s = report.cell_summary(runs)
    assert s["state"] is False and s["failed"] == 1 and s["failures"] == {"untrained": 1}
    assert s["end_nelbo"]["n"] == 2 and s["end_nelbo"]["mean"] == pytest.approx(4.6)
    assert s["spikes"] == {"runs_with_spikes": 1, "count": 3, "max_ratio": 4e5, "max_step": 114}
    assert report._cell_text(s) == "**1/3 failed** (untrained 1) · 4.6 ± 0.14 (2 of 3) · spikes in 1 (max 4e+05×)"


def test_a_cell_counts_nan_steps_skips_and_the_share_applied_as_table_4_does():
    runs = [_run(nan_steps=12, grad_skips=3, applied_share=0.985),
            _run(nan_steps=0, applied_share=1.0),
            _run(verdict="mostly skipped", passed=False, nan_steps=362, applied_share=0.638),
            _run(verdict="not run", passed=False, end_nelbo=None, nan_steps=0, applied_share=None)]
    s = report.cell_summary(runs)
    assert s["nan_steps"] == {"mean": pytest.approx(374 / 3), "max": 362}  # over the three runs that ran
    assert s["skips_by_reason"]["grad"] == pytest.approx(1.0) and s["skips_by_reason"]["nan"] == pytest.approx(374 / 3)
    assert s["applied_share"]["min"] == 0.638 and s["applied_share"]["mean"] == pytest.approx((0.985 + 1 + 0.638) / 3)
    assert "NaN steps 125 (max 362)" in report._cell_text(s) and "grad skips 1" in report._cell_text(s)
    why = report._why({**runs[2], "end_applied_share": 0.04, "first_nonfinite_loss_step": 337, "status": "x"})
    assert why == "mostly skipped: 4% of its last 10% of steps applied; 362 NaN steps, the first at step 337"
    # Efficient-VDVAE skips a step whose gradient norm is NaN while its loss is finite: no "step None"
    why = report._why({**runs[2], "verdict": "stalled", "first_failure": "step 61: update skipped (grad)",
                       "nan_steps": 40, "grad_skips": 60, "first_nonfinite_loss_step": None})
    assert why == ("stalled (first failing step: step 61: update skipped (grad)); 40 NaN steps (NaN gradients, "
                   "every loss finite), 60 high-gradient skips")


def test_a_grid_record_says_what_its_runs_ran_on_and_how_long_they_took():
    machine = {"cpu": "some cpu", "cpus": 2, "torch": "2.13.0", "python": "3.11"}
    runs = [_run(machine=machine, vaepatch_commit="abc", upstream_commit="ea35", wall_seconds=180.0),
            _run(machine=machine, vaepatch_commit="def", upstream_commit="ea35", wall_seconds=200.0),
            _run(verdict="not run", passed=False, wall_seconds=None)]
    meta = report.provenance({"off": {("vanilla", 0.02): runs}}, seconds=0.4)
    assert meta["machines"] == [machine] and meta["vaepatch_commits"] == ["abc", "def"]
    assert meta["upstream_commits"] == ["ea35"] and meta["runs"] == 2
    assert meta["runs_wall_seconds"] == 380.0 and meta["wall_seconds"] == 0.4  # a report-only pass: its own time


def test_each_skip_policy_is_measured_against_its_own_vanilla(tmp_path, monkeypatch):
    """Vanilla's margin differs per policy (0.001 without the rule, 0.003 with it): each policy's ratios and
    its "end NELBO at vanilla's margin" column, in margin.json and margin.md, must use that policy's own."""
    from types import SimpleNamespace

    monkeypatch.setattr(report, "plot", lambda *a, **k: None)  # the numbers are under test, not the figure
    passing = {  # policy -> variant -> {rate that passes: its end NELBO}; every other rate fails
        "off": {"vanilla": {0.001: 5.0}, "a": {0.001: 5.1, 0.003: 5.3}},
        "upstream": {"vanilla": {0.001: 6.0, 0.003: 6.2}, "a": {0.001: 6.1, 0.003: 6.3, 0.01: 6.5}}}
    failed = dict(verdict="non-finite", passed=False, end_nelbo=None, first_failure="step 2: loss non-finite",
                  status="stopped at its first non-finite loss")
    cells = {p: {(n, lr): [_run(seed=0, end_nelbo=rates[lr]) if lr in rates else _run(seed=0, **failed)]
                 for n, rates in by_name.items() for lr in LRS} for p, by_name in passing.items()}
    args = SimpleNamespace(target="vdvae", steps=4, stall_steps=3, start=0.001, every_cell=False)
    sm.write(tmp_path, args, ["off", "upstream"], ["vanilla", "a"], LRS, [0], [], cells, 1.0)

    ratios = {p: {n: m["ratio"] for n, m in by_name.items()}
              for p, by_name in json.loads((tmp_path / "margin.json").read_text())["margins"].items()}
    assert ratios["off"] == {"vanilla": 1.0, "a": pytest.approx(0.003 / 0.001)}
    assert ratios["upstream"] == {"vanilla": 1.0, "a": pytest.approx(0.01 / 0.003)}  # not 0.01 / 0.001

    lines = (tmp_path / "margin.md").read_text().splitlines()
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    header = split(next(line for line in lines if line.startswith("| variant | margin")))
    row = dict(zip(header, split(next(line for line in lines if line.startswith("| `a` |")))))
    assert [row[f"{h} (skip off)"] for h in ("margin", "× vanilla", "end NELBO at margin",
                                              "end NELBO at vanilla's margin")] == ["0.003", "×3", "5.3", "5.1"]
    assert [row[f"{h} (skip upstream)"] for h in ("margin", "× vanilla", "end NELBO at margin",
                                                   "end NELBO at vanilla's margin")] == ["0.01", "×3.33", "6.5", "6.3"]


def test_the_search_steps_down_from_a_failure_and_up_from_a_pass():
    lrs = [0.005, 0.01, 0.02, 0.04, 0.08]
    assert sm.next_rate({}, lrs, 0.02) == 0.02
    assert sm.next_rate({0.02: False}, lrs, 0.02) == 0.01
    assert sm.next_rate({0.02: False, 0.01: False}, lrs, 0.02) == 0.005
    assert sm.next_rate({0.02: False, 0.01: True}, lrs, 0.02) is None  # settled: margin 0.01
    assert sm.next_rate({0.02: True}, lrs, 0.02) == 0.04
    assert sm.next_rate({0.02: True, 0.04: True, 0.08: True}, lrs, 0.02) is None  # the grid's top passed
    assert sm.next_rate({0.005: False}, lrs, 0.005) is None  # the grid's bottom failed: margin none
    assert sm.next_rate({0.02: None}, lrs, 0.02) == 0.02  # not finished yet: still that cell


def test_log_grid():
    assert sm.log_grid("0.001:0.1:3") == [0.001, 0.01, 0.1]
    assert sm.log_grid("0.0316:1:4") == [0.0316, 0.1, 0.316, 1.0]  # printed as people write them
    assert sm.log_grid("0.03,0.01") == [0.01, 0.03]
    for bad in ("0.1:0.01:3", "0.01:0.1:1", "-1,2"):
        with pytest.raises(ValueError):
            sm.log_grid(bad)


def _write_run(run_dir, status, losses):
    run_dir.mkdir(parents=True, exist_ok=True)
    run_manifest.write(run_dir / "run.json", {"variant": "vanilla", "variant_spec": "vanilla", "status": status})
    with events.EventWriter(run_dir / "events.jsonl") as writer:
        for step, loss in enumerate(losses):
            writer.write(step, loss, 1.0, loss is None, "nan" if loss is None else None, 0.1)


def _fake_launcher(outcomes, launched):
    """A launcher that writes, instead of training, the losses ``outcomes(variant, lr, policy)`` gives."""
    def launch(job):
        command, log = job
        run_dir = log.parent
        assert not (run_dir / "events.jsonl").exists()  # an interrupted attempt was cleared
        launched.append(command)
        variant = command[command.index("--variant") + 1]
        lr = float(command[command.index("--lr") + 1])
        policy = "off" if "--skip_threshold" in command else "upstream"
        _write_run(run_dir, "stopped at --max-steps 4", outcomes(variant, lr, policy))
        return 0
    return launch


def test_the_grid_runs_only_the_deciding_cells_under_each_skip_policy(tmp_path, monkeypatch):
    import vaepatch.targets.vdvae.tiny as tiny

    monkeypatch.setattr(tiny, "make_data", lambda dest, steps: dest)
    lrs = [0.005, 0.01, 0.02, 0.04, 0.08]
    cliffs = {("vanilla", "upstream"): 0.02, ("vanilla", "off"): 0.01, ("qfloor-cst1", "upstream"): 0.02,
              ("qfloor-cst1", "off"): 0.08}

    def outcomes(variant, lr, policy):
        return [6.0, 5.0, 4.0, 4.0] if lr < cliffs[(variant, policy)] else [6.0, 5.0, None, None]  # NaN at the end

    launched = []
    cells = sm.run_grid("vdvae", tmp_path, ["upstream", "off"], ["vanilla", "qfloor-cst1"], lrs, [0, 1], steps=4,
                        stall_steps=5, start=0.02, jobs=1, launch=_fake_launcher(outcomes, launched))
    ran = sorted({(c[c.index("--variant") + 1], float(c[c.index("--lr") + 1]), "--skip_threshold" in c) for c in launched})
    # qfloor-cst1 also at vanilla's margin under each policy (0.01 with the rule, 0.005 without): the loss
    # at the same rate, beside the one its own margin buys
    assert ran == [("qfloor-cst1", 0.005, True), ("qfloor-cst1", 0.01, False), ("qfloor-cst1", 0.02, False),
                   ("qfloor-cst1", 0.02, True), ("qfloor-cst1", 0.04, True), ("qfloor-cst1", 0.08, True),
                   ("vanilla", 0.005, True), ("vanilla", 0.01, False), ("vanilla", 0.01, True), ("vanilla", 0.02, False),
                   ("vanilla", 0.02, True)]
    assert len(launched) == 2 * len(ran)  # both seeds of every cell
    for command in launched:  # --skip off reaches train.py's arguments as VDVAE's own -1 threshold, after `--`
        if "--skip_threshold" in command:
            assert command[command.index("--skip_threshold") + 1] == "-1"
            assert command.index("--skip_threshold") > command.index("--")
        # runs go on past a NaN step, as the upstream does (stopping there is an opt-in for smoke runs)
        assert command[command.index("--stop-when-stalled") + 1] == "5" and "--stop-at-nonfinite" not in command
    states = {p: {key: report.cell_state(runs) for key, runs in cells[p].items()} for p in cells}
    result = {p: report.margins(states[p], lrs, ["vanilla", "qfloor-cst1"]) for p in cells}
    assert result["off"]["vanilla"]["margin"] == 0.005 and result["off"]["qfloor-cst1"]["margin"] == 0.04
    assert result["off"]["qfloor-cst1"]["ratio"] == 8 and result["upstream"]["qfloor-cst1"]["ratio"] == 1
    assert all(r["settled"] for p in result for r in result[p].values())
    # rerun: every deciding run is finished, nothing launches again
    again = []
    sm.run_grid("vdvae", tmp_path, ["upstream", "off"], ["vanilla", "qfloor-cst1"], lrs, [0, 1], steps=4, stall_steps=5,
                start=0.02, jobs=1, launch=_fake_launcher(outcomes, again))
    assert again == []
    # on another machine the run folders are gone: the verdict records left beside them are enough
    records = tmp_path / "records"
    sm.run_grid("vdvae", tmp_path, ["upstream", "off"], ["vanilla", "qfloor-cst1"], lrs, [0, 1], steps=4,
                stall_steps=5, start=0.02, jobs=1, launch=_fake_launcher(outcomes, again), records=records)
    assert again == [] and len(list(records.rglob("seed*.json"))) == len(launched)
    moved = tmp_path / "elsewhere"
    cells_there = sm.run_grid("vdvae", moved, ["upstream", "off"], ["vanilla", "qfloor-cst1"], lrs, [0, 1], steps=4,
                              stall_steps=5, start=0.02, jobs=1, launch=_fake_launcher(outcomes, again), records=records)
    assert again == [] and not (moved / "runs").exists()
    assert {p: {k: [r["verdict"] for r in v] for k, v in c.items()} for p, c in cells_there.items()} == \
        {p: {k: [r["verdict"] for r in v] for k, v in c.items()} for p, c in cells.items()}


def test_an_interrupted_run_is_started_over_and_a_launcher_that_dies_is_recorded(tmp_path, monkeypatch):
    import vaepatch.targets.vdvae.tiny as tiny

    monkeypatch.setattr(tiny, "make_data", lambda dest, steps: dest)
    _write_run(sm._run_dir(tmp_path, "upstream", "vanilla", 0.01, 0), "running", [6.0])  # killed mid-run
    launched = []
    sm.run_grid("vdvae", tmp_path, ["upstream"], ["vanilla"], [0.01], [0], steps=4, stall_steps=5, jobs=1,
                launch=_fake_launcher(lambda *a: [6.0, 5.0, 4.0, 3.0], launched))
    assert len(launched) == 1
    # a launcher that exits before writing run.json: recorded as crashed, not retried forever
    run_dir = sm._run_dir(tmp_path, "upstream", "vanilla", 0.02, 0)
    run_dir.mkdir(parents=True)
    log = run_dir / "stdout.txt"
    code = sm._one((["python", "-c", "import sys; print('no mpi4py'); sys.exit(3)"], log))
    assert code == 3 and run_manifest.read(run_dir / "run.json")["status"].startswith("crashed: exit code 3")


def test_skip_off_is_refused_for_nvae_which_has_no_skip_rule(capsys):
    with pytest.raises(SystemExit):
        sm.main(["--target", "nvae", "--skip", "off", "--report-only"])
    assert "has no skip rule to turn off" in capsys.readouterr().err


CLONE, WHY_NOT = vdvae_clone()


@pytest.mark.skipif(CLONE is None, reason=f"SKIPPED, needs a real clone: {WHY_NOT}")
def test_quick_grid_end_to_end_on_the_real_vdvae(tmp_path):
    pytest.importorskip("mpi4py")
    out = tmp_path / "m"
    assert sm.main(["--quick", "--out", str(out)]) == 0
    data = json.loads((out / "margin.json").read_text())
    assert data["meta"]["variants"] == ["vanilla", "upbounded1"] and data["meta"]["skip"] == ["off", "upstream"]
    ran = [c for c in data["cells"] if c["state"] is not None]
    assert {c["skip"] for c in ran} == {"upstream", "off"}
    for cell in ran:
        (run,) = cell["runs"]
        assert run["steps"] == 4 and run["status"].startswith("stopped")
        log = events.read(out / run["run"]).events  # records name a run from the grid's folder
        assert all(isinstance(e["kl"], float) and "posterior" in e["scale"] for e in log)
        # what VDVAE itself parsed (its log's hparam lines): the policy reached upstream's train.py
        hparams = {}
        for line in (next(iter((out / run["run"] / "vdvae").glob("*/log.jsonl")))).read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "hparam":
                hparams[record["key"]] = record["value"]
        assert hparams["skip_threshold"] == (-1 if cell["skip"] == "off" else 400)
    assert (out / "margin.png").stat().st_size > 1000 and "| `vanilla` |" in (out / "margin.md").read_text()
    first = out / next(c["runs"][0]["run"] for c in ran)
    before = (first / "events.jsonl").stat().st_mtime
    assert sm.main(["--quick", "--out", str(out)]) == 0  # resumed: every run was finished
    assert (first / "events.jsonl").stat().st_mtime == before
