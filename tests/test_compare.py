"""`vaepatch compare` on crafted run directories: exact counts, every bad input reported, no crash."""
import csv
import io
import json
import math

import pytest

from vaepatch import compare
from vaepatch.runs import events

NAN = float("nan")


def _run(root, name, variant, seed, rows, status="completed", spec=None, **manifest):
    """A launcher-style run: rows are (loss, skipped, reason) for steps 0, 1, ..."""
    run = root / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps(dict(variant=variant, variant_spec=spec or variant, seed=seed,
                                                  status=status, **manifest)))
    with events.EventWriter(run / "events.jsonl") as w:
        for step, (loss, skipped, reason) in enumerate(rows):
            w.write(step, loss, 1.0, skipped, reason, 0.1)
    return run


def _compare(capsys, *args):
    code = compare.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_counts_mean_and_std_per_variant_from_events(tmp_path, capsys):
    _run(tmp_path, "v0", "vanilla", 0, [(1.0, False, None), (NAN, True, "nan"), (5.0, True, "grad")])
    _run(tmp_path, "v1", "vanilla", 1, [(1.0, False, None), (NAN, True, "nan"), (NAN, True, "nan"), (2.0, True, "amp")])
    _run(tmp_path, "u0", "upbounded1", 0, [(1.0, False, None), (2.0, False, None), (3.0, False, None)])
    code, out, _ = _compare(capsys, tmp_path, "--format", "json")
    assert code == 0
    by = {s["variant"]: s for s in json.loads(out)}
    v = by["vanilla"]
    assert (v["runs"], v["steps"]) == (2, 7)
    assert v["nan_steps"] == {"mean": 1.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2}
    assert v["grad_skips"]["mean"] == 0.5 and v["amp_skips"]["mean"] == 0.5
    assert v["first_nan_step"]["mean"] == 1
    assert v["end_loss"] == {"mean": 3.5, "std": pytest.approx(math.sqrt(4.5)), "n": 2}  # last step of each
    assert by["upbounded1"]["nan_steps"] == {"mean": 0.0, "std": 0.0, "n": 1}
    assert set(v) >= {"variant", "runs", "steps", "nan_steps", "grad_skips", "amp_skips", "end_loss", "problems"}


def test_markdown_and_csv_agree(tmp_path, capsys):
    _run(tmp_path, "a", "vanilla", 0, [(1.0, False, None), (NAN, True, "nan")])
    _run(tmp_path, "b", "explin", 0, [(1.0, False, None), (4.0, True, "grad")])
    _, md, _ = _compare(capsys, tmp_path)
    lines = md.splitlines()
    # no run had an AMP skip: that column is left out (it exists only on CUDA with AMP)
    assert lines[0].startswith("| variant | runs | passed | steps | NaN steps | high-grad skips | first NaN step |")
    # a variant with one run shows no ± part; each run's last step (its last tenth) was not applied
    assert lines[2].startswith("| vanilla | 1 | 0/1 (mostly skipped 1) | 2 | 1 | 0 | 1 |")
    assert lines[3].startswith("| explin | 1 | 0/1 (mostly skipped 1) | 2 | 0 | 1 | - |")
    _, text, _ = _compare(capsys, tmp_path, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(text)))
    assert [(r["variant"], r["nan_steps_mean"], r["grad_skips_mean"]) for r in table] == [
        ("vanilla", "1.0", "0.0"), ("explin", "0.0", "1.0")]


def test_one_step_logged_by_two_ranks_counts_once(tmp_path, capsys):
    run = _run(tmp_path, "r", "vanilla", 0, [])
    with events.EventWriter(run / "events.jsonl", rank=0) as r0, events.EventWriter(run / "events.jsonl", rank=1) as r1:
        r0.write(0, 1.0, 1.0, False, None, 0.1)
        r1.write(0, 1.2, 1.0, False, None, 0.1)
        r0.write(1, 2.0, 1.0, True, "nan", 0.1)   # rank 1 finite but the step was skipped for rank 0's NaN
        r1.write(1, NAN, 1.0, True, "nan", 0.1)
    s = json.loads(_compare(capsys, tmp_path, "--format", "json")[1])[0]
    assert s["steps"] == 2 and s["nan_steps"]["mean"] == 1


def test_resumed_run_later_record_wins(tmp_path, capsys):
    run = _run(tmp_path, "r", "vanilla", 0, [(1.0, False, None), (2.0, False, None)])
    with open(run / "events.jsonl", "a") as f:  # a tool that re-logs step 1 after a restore
        f.write(json.dumps(dict(step=1, rank=0, loss=None, finite=False, grad_norm=None, skipped=True,
                                reason="nan", time=0.1)) + "\n")
    s = json.loads(_compare(capsys, tmp_path, "--format", "json")[1])[0]
    assert (s["steps"], s["nan_steps"]["mean"]) == (2, 1)
    assert any("later record was used" in p for p in s["problems"])


def test_every_bad_input_is_reported_never_dropped(tmp_path, capsys):
    good = _run(tmp_path, "good", "vanilla", 0, [(1.0, False, None), (2.0, False, None)])
    with open(good / "events.jsonl", "a") as f:
        f.write("this is not json\n")
        f.write('{"step": 5, "rank": 0, "loss": NaN, "finite": false, "grad_norm": 1.0, "skipped": true, '
                '"reason": "nan", "time": 0.1}\n')
        f.write('{"step": 6, "rank": 0, "lo')  # killed mid-line
    no_events = tmp_path / "noevents"
    no_events.mkdir()
    (no_events / "run.json").write_text(json.dumps({"variant": "explin", "variant_spec": "explin", "status": "running"}))
    broken_manifest = tmp_path / "brokenjson"
    broken_manifest.mkdir()
    (broken_manifest / "run.json").write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _compare(capsys, tmp_path, empty, tmp_path / "missing", "--format", "json")
    assert code == 0
    summary = {s["variant"]: s for s in json.loads(out)}
    good_problems = summary["vanilla"]["problems"]
    assert summary["vanilla"]["steps"] == 3  # the NaN literal is a step (counted like null)...
    assert summary["vanilla"]["nan_steps"]["mean"] == 1
    assert len(good_problems) == 2  # ...the 2 broken lines are not counted, and each one is named
    assert any("line 3" in p and "not JSON" in p for p in good_problems)
    assert not any("line 4" in p for p in good_problems)
    assert any("line 5" in p and "truncated last line" in p for p in good_problems)
    assert summary["explin"]["steps"] == 0 and "killed" in summary["explin"]["status"][0]
    assert any("no events file" in p for p in summary["explin"]["problems"])
    assert any("not readable JSON" in p for p in summary["? (brokenjson)"]["problems"])
    assert f"{empty}: no runs found" in err and "missing: does not exist" in err


def test_mixed_variants_in_one_directory_are_grouped_by_resolved_spec(tmp_path, capsys):
    spec = "posterior=upbounded(1),prior=upbounded(1)"
    _run(tmp_path / "grid", "a", "upbounded1", 0, [(1.0, False, None)], spec=spec)
    _run(tmp_path / "grid", "b", spec, 1, [(1.0, False, None), (NAN, True, "nan")], spec=spec)
    _run(tmp_path / "grid", "c", "vanilla", 0, [(1.0, False, None)])
    summary = json.loads(_compare(capsys, tmp_path / "grid", "--format", "json")[1])
    assert [(s["variant"], s["runs"], s["steps"]) for s in summary] == [("upbounded1", 2, 3), ("vanilla", 1, 1)]


def test_nothing_found_exits_nonzero_with_a_reason(tmp_path, capsys):
    code, out, err = _compare(capsys, tmp_path)
    assert code == 1 and "no runs found" in err


def _vdvae_log(path, records):
    path.mkdir(parents=True)
    with open(path / "log.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")  # Python's json writes NaN literals, as VDVAE's logger does


def test_vdvae_own_log_windows_are_deduplicated(tmp_path, capsys):
    # iters_per_print 4: regular records at steps 0, 4, 8 (windows [0], [1..4], [5..8]); extra
    # early-eval records at 1 and 8 and a save-time record (no lr) overlap them and must be ignored.
    records = [{"type": "hparam", "key": "iters_per_print", "value": 4}, {"type": "hparam", "key": "desc", "value": "x"},
               {"type": "hparam", "key": "seed", "value": 3},
               {"type": "train_loss", "lr": 1e-4, "step": 0, "elbo": 6.0, "skipped_updates": 0, "distortion_nans": 0, "rate_nans": 0},
               {"type": "train_loss", "lr": 1e-4, "step": 1, "elbo": 6.0, "skipped_updates": 1, "distortion_nans": 1, "rate_nans": 0},
               {"type": "train_loss", "lr": 1e-4, "step": 4, "elbo": NAN, "skipped_updates": 3, "distortion_nans": 1, "rate_nans": 1},
               {"type": "train_loss", "step": 8, "elbo": 5.0, "skipped_updates": 3, "distortion_nans": 0, "rate_nans": 0},
               {"type": "train_loss", "lr": 1e-4, "step": 8, "elbo": 5.0, "skipped_updates": 2, "distortion_nans": 0, "rate_nans": 0},
               {"type": "eval_loss", "step": 8, "elbo": 5.5}, {"type": "eval_loss", "step": 9, "elbo": 5.2}]
    _vdvae_log(tmp_path / "x", records)
    s = json.loads(_compare(capsys, tmp_path, "--format", "json")[1])[0]
    assert s["variant"] == "vdvae log (x)" and s["seeds"] == [3]
    assert s["steps"] == 9 and s["nan_steps"]["mean"] == 1 and s["grad_skips"]["mean"] == 4
    assert s["skipped"]["mean"] == 5
    assert s["eval_loss"]["mean"] == 5.2 and s["best_eval_loss"]["mean"] == 5.2
    assert s["bits_per_dim"]["mean"] == pytest.approx(5.2 / math.log(2))
    assert any("windows overlap" in p for p in s["problems"])


def test_eval_loss_of_a_launcher_run_comes_from_the_upstream_log(tmp_path, capsys):
    logdir = tmp_path / "vdvae" / "desc"
    _vdvae_log(logdir, [{"type": "eval_loss", "elbo": 4.0}, {"type": "eval_loss", "elbo": NAN}])
    _run(tmp_path / "runs", "r", "vanilla", 0, [(1.0, False, None)], upstream_logdir=str(logdir), loss_unit="nats/dim")
    s = json.loads(_compare(capsys, tmp_path / "runs", "--format", "json")[1])[0]
    assert s["eval_loss"]["n"] == 0 and s["best_eval_loss"]["mean"] == 4.0  # final eval was NaN


def _lines(ax):
    """Each line drawn on ``ax``: (x, y, colour, label or None)."""
    return [(list(line.get_xdata()), list(line.get_ydata()), line.get_color(),
             None if line.get_label().startswith("_") else line.get_label()) for line in ax.get_lines()]


def _plotted_runs(root):
    _run(root, "a", "vanilla", 0, [(1.0, False, None), (NAN, True, "nan"), (2.0, True, "grad"), (3.0, False, None)])
    _run(root, "b", "vanilla", 1, [(1.0, False, None), (2.0, False, None), (0.5, True, "grad")])
    _run(root, "c", "explin", 0, [(1.0, False, None), (0.5, False, None)])
    return [compare.load_run(root / name) for name in "abc"]


def test_plot_draws_each_runs_loss_and_cumulative_skips(tmp_path, capsys):
    import matplotlib.pyplot as plt

    fig = compare.figure(_plotted_runs(tmp_path / "runs"), right="skips")
    try:
        ax_loss, ax_right = fig.axes
        # left: finite steps only (run a's NaN at step 1 leaves a gap); one colour per variant, labelled once
        assert _lines(ax_loss) == [([0, 2, 3], [1.0, 2.0, 3.0], "C0", "vanilla"), ([0, 1, 2], [1.0, 2.0, 0.5], "C0", None),
                                   ([0, 1], [1.0, 0.5], "C1", "explin")]
        # right: skipped updates so far, per run (a: skipped at steps 1 and 2; b: at step 2; c: never)
        assert _lines(ax_right) == [([0, 1, 2, 3], [0, 1, 2, 2], "C0", "vanilla"), ([0, 1, 2], [0, 0, 1], "C0", None),
                                    ([0, 1], [0, 0], "C1", "explin")]
        assert ax_loss.get_yscale() == "log" and ax_right.get_title() == "cumulative skipped updates"
    finally:
        plt.close(fig)
    png = tmp_path / "fig" / "cmp.png"
    code, _, err = _compare(capsys, tmp_path / "runs", "--plot", png)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in err


def test_plot_draws_the_share_of_runs_still_free_of_nan(tmp_path):
    import matplotlib.pyplot as plt

    runs = _plotted_runs(tmp_path / "runs")
    fig = compare.figure(runs, right="survival")
    try:
        ax_right = fig.axes[1]
        # vanilla: run a's NaN at step 1 leaves 1 of 2 from there; run b ended cleanly at step 2 and still counts at 3;
        # every variant's curve spans every run's steps (explin's run ended at step 1)
        assert _lines(ax_right) == [([0, 1, 2, 3], [1.0, 0.5, 0.5, 0.5], "C0", "vanilla (2 runs)"),
                                    ([0, 1, 2, 3], [1.0, 1.0, 1.0, 1.0], "C1", "explin (1 runs)")]
        assert all(line.get_drawstyle() == "steps-post" for line in ax_right.get_lines())
        assert ax_right.get_title() == "runs still free of NaN" and len(fig.axes[0].get_lines()) == 3
    finally:
        plt.close(fig)
    png = compare.plot(runs, tmp_path / "survival.png", right="survival")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_survival_is_the_share_of_runs_with_no_nan_up_to_each_step():
    def run(losses):
        return compare.Run(path=None, variant="v", curve=[(s, loss, loss is None) for s, loss in enumerate(losses)])

    nan_at_3 = run([5.0, 4.0, 3.0, None, 2.0, 1.0, 1.0, 1.0])  # finite again after its NaN: still counted out
    clean = run([5.0, 4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    ended_at_5 = run([5.0, 4.0, 3.0, 2.0, 2.0, 1.0])  # ended cleanly: free of NaN at steps 6 and 7 too
    steps, share = compare.survival([nan_at_3, clean, ended_at_5])
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7]
    assert share == pytest.approx([1, 1, 1, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert compare.survival([clean]) == (list(range(8)), [1.0] * 8)
    assert compare.survival([run([None, 1.0])]) == ([0, 1], [0.0, 0.0])
    assert compare.survival([ended_at_5], last=7) == (list(range(8)), [1.0] * 8)  # spans the steps asked for
    nan_gradient_at_2 = run([5.0, 4.0, 3.0, 2.0])  # a finite loss, its update skipped for a NaN (events: "nan")
    nan_gradient_at_2.counts = events.Counts(first_nan_step=2)
    assert compare.survival([nan_gradient_at_2, clean]) == (list(range(8)), [1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_nvae_eval_loss_and_bits_per_dim_come_from_nvae_log(tmp_path, capsys):
    logdir = tmp_path / "nvae" / "eval-x"
    logdir.mkdir(parents=True)
    (logdir / "log.txt").write_text(
        "11/21 06:05:58 PM (Elapsed: 00:00:02) train_nelbo 3447.074951\n"
        "11/21 06:05:58 PM (Elapsed: 00:00:02) valid_nelbo 2829.989746\n"
        "11/21 06:05:58 PM (Elapsed: 00:00:02) valid bpd elbo 1.329040\n"
        "11/21 06:06:00 PM (Elapsed: 00:00:04) valid_nelbo nan\n"
        "11/21 06:06:20 PM (Elapsed: 00:00:24) final valid nelbo 2800.5\n")
    _run(tmp_path / "runs", "r", "explin", 0, [(3000.0, False, None), (3100.0, True, "amp"), (NAN, True, "nan")], target="nvae",
         upstream_logdir=str(logdir), loss_unit="nats/image", dims_per_image=3072)
    run = compare.load_run(tmp_path / "runs" / "r")
    assert (run.eval_final, run.eval_best) == (2800.5, 2800.5)
    assert run.bits_per_dim == pytest.approx(2800.5 / math.log(2) / 3072)
    s = json.loads(_compare(capsys, tmp_path / "runs", "--format", "json")[1])[0]
    assert s["amp_skips"]["mean"] == 1 and s["nan_steps"]["mean"] == 1
    assert s["bits_per_dim"]["mean"] == pytest.approx(2800.5 / math.log(2) / 3072)
    without_dims = _run(tmp_path / "more", "r", "explin", 0, [(1.0, False, None)], target="nvae",
                        upstream_logdir=str(logdir), loss_unit="nats/image")
    assert compare.load_run(without_dims).bits_per_dim is None  # no unit conversion without the dimension count


def test_a_key_in_compare_and_in_a_verdict_means_the_same_thing(tmp_path):
    """compare's JSON (per variant, mean over runs) and the stability-margin bench's run records
    (``vaepatch.runs.verdict``) share a vocabulary: on a variant of one run, every shared key agrees."""
    from vaepatch.runs import verdict

    rows = [(6.0, False, None), (5.0, False, None), (9e3, True, "grad"), (4.0, False, None), (NAN, True, "nan"),
            (3.0, True, "amp"), (3.5, False, None), (3.0, False, None), (2.5, False, None), (2.0, False, None),
            (1.9, False, None)]
    run_dir = _run(tmp_path, "r", "vanilla", 0, rows, status="stopped at --max-steps 11")
    (summary,) = compare.summarize([compare.load_run(run_dir)])
    record = verdict.judge_dir(run_dir, steps=len(rows))
    shared = set(summary) & set(record)
    assert {"steps", "grad_skips", "amp_skips", "nonfinite_origins", "status"} <= shared
    for key in shared:
        value = summary[key]
        value = value["mean"] if isinstance(value, dict) and "mean" in value else value
        assert value == ([record[key]] if key == "status" else record[key]), key  # compare lists its runs' statuses
    # the words each side has on its own are counted the same way underneath
    counts = events.count(events.read(run_dir).events)
    assert summary["nan_steps"]["mean"] == counts.nan_steps == 1
    assert record["nonfinite_loss_steps"] == counts.nonfinite_loss_steps == 1
    assert summary["end_loss"]["mean"] == pytest.approx(1.95)  # mean logged loss of the last 2 of 11 steps
    assert record["end_nelbo"] == pytest.approx(1.95)  # no kl/recon parts logged: the NELBO is the loss


def test_a_run_stalled_from_step_0_counts_as_stalled(tmp_path, capsys):
    """Step 0 is a real first step of a stall (a run dead from the start), not "no stall": with every
    update skipped it counts, beside one stalled later and one that never stalled."""
    skip, ok = (9e3, True, "grad"), (1.0, False, None)
    _run(tmp_path, "a", "vanilla", 0, [ok] * 4, stall_steps=3)
    _run(tmp_path, "b", "vanilla", 1, [skip] * 4, stall_steps=3)  # stalled since step 0
    _run(tmp_path, "c", "vanilla", 2, [ok, ok] + [skip] * 3, stall_steps=3)  # stalled since step 2
    _, out, _ = _compare(capsys, tmp_path, "--format", "json")
    (summary,) = json.loads(out)
    assert summary["stalled"]["runs"] == 2 and summary["stalled"]["since"] == [None, 0, 2]
    _, md, _ = _compare(capsys, tmp_path)
    header, _, row = md.splitlines()[:3]
    assert header.rstrip(" |").endswith("| stalled") and row.endswith("| 2/3 (since step 0, 2) |")


def test_each_run_is_judged_as_its_upstream_trains_and_the_report_stays_short(tmp_path, capsys):
    """NaN steps a run recovers from are counted and it passes; one NaN-ing through its end fails; the
    Markdown lists the five commonest places runs broke and says how many more there were."""
    good = [(6.0 - i / 10, False, None) for i in range(20)]
    recovers = list(good)
    recovers[5] = recovers[6] = (NAN, True, "nan")
    _run(tmp_path, "r0", "vanilla", 0, recovers, max_steps=20)
    _run(tmp_path, "r1", "vanilla", 1, good[:18] + [(NAN, True, "nan")] * 2, max_steps=20)
    _run(tmp_path, "r2", "vanilla", 2, good[:10], status="stopped at --max-steps 10", max_steps=20)
    s = json.loads(_compare(capsys, tmp_path, "--format", "json")[1])[0]
    assert s["verdicts"] == {"incomplete": 1, "mostly skipped": 1, "passed": 1} and s["nan_steps"]["mean"] == pytest.approx(4 / 3)
    row = next(line for line in _compare(capsys, tmp_path)[1].splitlines() if line.startswith("| vanilla"))
    assert row.split("|")[3].strip() == "1/3 (incomplete 1, mostly skipped 1)"
    origins = {f"kl non-finite at block {i}: cause": 10 - i for i in range(8)}
    lines = compare.provenance_lines([{"variant": "v", "nonfinite_origins": origins, "first_failures": []}])
    assert len(lines) == 3 + 5 + 1 and lines[-1] == "  - 12 more in 3 other places (--format json lists all)"
