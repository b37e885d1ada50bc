"""`vaepatch bench skip-counts`: the threshold calibration rule, the run order, a grid through a fake
launcher (calibration first, the threshold on every bind run, records that a second call resumes
from), and the Table 4 report drawn from records alone."""
import json

import pytest

from vaepatch.bench import skip_counts as sc
from vaepatch.bench.skip_counts import report
from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest

STEPS = 40


def _event(step, grad_norm, skipped=False, reason=None, loss=5.0):
    return {"step": step, "rank": 0, "loss": loss, "finite": loss is not None, "grad_norm": grad_norm,
            "skipped": skipped, "reason": reason, "time": 0.1}


def test_calibration_reads_the_second_half_and_rounds_up():
    # first half: large early norms (warm-up) that must not count; second half: 1..1000, one skipped at 5000
    log = [_event(s, 900.0) for s in range(1000)]
    log += [_event(1000 + i, float(i + 1)) for i in range(1000)]
    log.append(_event(2000, 5000.0, skipped=True, reason="grad"))
    c = sc.calibrate(log, quantile=0.01)
    # 1000 applied norms 1..1000 in the second half (the skipped one left out): 1% exceed 990
    assert c["applied_steps"] == 1000 and c["threshold"] == 990 and c["exceeded_by"] == 10
    assert c["from_steps"] == [1000, 2000]
    rounded = sc.calibrate([_event(s, 1.0 + s / 1000.0) for s in range(2000)], quantile=0.001)
    assert rounded["threshold"] == 3.0  # 2.998 rounded up to two significant digits


def test_run_order_is_policy_then_seeds_round_robin_priority_first():
    jobs = sc.order(["bind", "off"], ["explin", "vanilla", "upbounded1"], [0, 1])
    assert jobs[:6] == [("bind", "vanilla", 0), ("bind", "upbounded1", 0), ("bind", "vanilla", 1),
                        ("bind", "upbounded1", 1), ("bind", "explin", 0), ("bind", "explin", 1)]
    assert jobs[6][0] == "off" and len(jobs) == 12


def _fake_launcher(launched):
    """Writes, instead of training, a run whose gradient norms and NaN steps depend on its command."""
    def launch(job):
        command, log = job
        run_dir = log.parent
        launched.append(command)
        variant = command[command.index("--variant") + 1]
        threshold = float(command[command.index("--skip_threshold") + 1])
        run_manifest.write(run_dir / "run.json", {"variant": variant, "variant_spec": variant,
                                                  "status": f"stopped at --max-steps {STEPS}",
                                                  "started": "2026-12-06T10:00:00+00:00",
                                                  "ended": "2026-12-06T10:01:00+00:00"})
        with events.EventWriter(run_dir / "events.jsonl") as writer:
            for step in range(STEPS):
                norm = 10.0 + (7 * step) % 10  # 10..19, in a shuffled order
                nan = variant == "vanilla" and step in (7, 8)
                grad = not nan and threshold != -1 and norm >= threshold
                reason = "nan" if nan else ("grad" if grad else None)
                writer.write(step, None if nan else 6.0 - step / STEPS, norm, reason is not None, reason, 0.1)
        return 0
    return launch


def test_a_grid_calibrates_first_records_every_run_and_resumes_from_the_records(tmp_path, monkeypatch):
    import vaepatch.targets.vdvae.tiny as tiny

    monkeypatch.setattr(tiny, "make_data", lambda dest, steps: dest)
    argv = ["--out", str(tmp_path / "grid"), "--variants", "vanilla,upbounded1", "--seeds", "0,1", "--steps",
            str(STEPS), "--quantile", "0.25", "--jobs", "2"]
    launched = []
    args = sc._parse(argv)
    args.records = tmp_path / "records"
    records, calibration = sc.run(args, tmp_path / "grid", launch=_fake_launcher(launched))
    first = launched[0]
    assert first[first.index("--variant") + 1] == "vanilla" and first[first.index("--skip_threshold") + 1] == "-1"
    # second half of vanilla's rule-off run: steps 20..39, norms 10..19 twice, NaN steps none there;
    # 25% of those 20 applied steps may exceed the threshold: the 15th smallest norm
    norms = sorted(10.0 + (7 * s) % 10 for s in range(20, STEPS))
    expected = norms[int(0.75 * len(norms)) - 1]
    assert calibration["threshold"] == expected
    assert json.loads((args.records / "threshold.json").read_text())["threshold"] == expected
    binds = [c for c in launched if c[c.index("--skip_threshold") + 1] != "-1"]
    assert len(binds) == 4 and all(float(c[c.index("--skip_threshold") + 1]) == expected for c in binds)
    assert len(launched) == 8 and len(records) == 8
    vanilla = records[("bind", "vanilla", 0)]
    # a NaN step is counted, not a failure; the threshold skips every step whose norm reached it
    assert vanilla["verdict"] == "passed" and vanilla["nan_step_list"] == [7, 8] and vanilla["nan_steps"] == 2
    assert vanilla["grad_skip_steps"] == [s for s in range(STEPS) if s not in (7, 8) and 10 + (7 * s) % 10 >= expected]
    assert vanilla["wall_seconds"] == 60.0 and vanilla["threshold"] == expected
    assert len(list(args.records.glob("skip-*/*.json"))) == 8
    # a second call, on a machine without the run folders: everything comes from the records
    again = []
    args2 = sc._parse(argv)
    args2.records = args.records
    records2, calibration2 = sc.run(args2, tmp_path / "elsewhere", launch=_fake_launcher(again))
    assert again == [] and records2.keys() == records.keys() and calibration2["threshold"] == expected


def test_the_report_puts_the_papers_row_beside_ours_and_draws_the_figure(tmp_path, monkeypatch):
    import vaepatch.targets.vdvae.tiny as tiny

    monkeypatch.setattr(tiny, "make_data", lambda dest, steps: dest)
    argv = ["--out", str(tmp_path / "grid"), "--variants", "vanilla,upbounded1", "--seeds", "0,1", "--steps",
            str(STEPS), "--quantile", "0.25"]
    args = sc._parse(argv)
    args.records = tmp_path / "grid" / "records"
    sc.run(args, tmp_path / "grid", launch=_fake_launcher([]))
    assert sc.main(argv + ["--report-only"]) == 0
    text = (tmp_path / "grid" / "skip_counts.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `vanilla`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2 of 2" and cells[3] == "2 ± 0" and cells[4] == "0"  # NaN steps 2 in both, no stall
    assert cells[-3:] == ["22 ± 9", "13 ± 3", "2.014 ± 0.009"]  # the paper's Table 4 row
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert all(line.count("|") == header.count("|") for line in text.splitlines() if line.startswith("| `"))
    summary = json.loads((tmp_path / "grid" / "skip_counts.json").read_text())
    assert summary["rows"]["off"]["upbounded1"]["grad_skips"]["mean"] == 0
    assert summary["meta"]["runs_wall_seconds"] == 8 * 60.0
    assert (tmp_path / "grid" / "skip_counts.png").stat().st_size > 10_000


@pytest.mark.parametrize("bad", [["--skip", "sometimes"], ["--seeds", "1"], ["--quantile", "2"]])
def test_bad_settings_are_refused_with_the_reason(bad, capsys):
    with pytest.raises(SystemExit):
        sc._parse(["--variants", "vanilla", *bad])
    assert "error:" in capsys.readouterr().err


def test_a_resumed_grid_runs_its_bind_runs_alone_at_the_saved_calibration(tmp_path, monkeypatch, capsys):
    import vaepatch.targets.vdvae.tiny as tiny

    monkeypatch.setattr(tiny, "make_data", lambda dest, steps: dest)
    argv = ["--out", str(tmp_path / "grid"), "--records", str(tmp_path / "records"), "--variants", "upbounded1",
            "--seeds", "1", "--steps", str(STEPS), "--skip", "bind"]
    with pytest.raises(SystemExit):  # nothing calibrated yet, and the grid cannot calibrate
        sc._parse(argv)
    assert "threshold.json" in capsys.readouterr().err
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "threshold.json").write_text(json.dumps({"threshold": 14.0, "rule": "earlier grid"}))
    launched = []
    args = sc._parse(argv)
    records, calibration = sc.run(args, args.out, launch=_fake_launcher(launched))
    assert calibration["threshold"] == 14.0 and list(records) == [("bind", "upbounded1", 1)]
    assert len(launched) == 1 and float(launched[0][launched[0].index("--skip_threshold") + 1]) == 14.0
