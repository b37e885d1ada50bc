"""Failure provenance and stalled runs without an upstream: GroupWatch on known tensors, the stall
rule of the step recorder, and what events and compare make of both."""
import json
import math

import pytest
import torch

from vaepatch import compare, scales
from vaepatch.runs import events, provenance
from vaepatch.runs.recorder import StepRecorder, StopStalled

EXP, UPB = scales.get("exp"), scales.get("upbounded1")


def _watch(kls, raws, posterior=EXP, prior=EXP):
    watch = provenance.GroupWatch([f"block {i}" for i in range(len(kls))], {"posterior": posterior, "prior": prior})
    for group, kl in enumerate(kls):
        watch.kl(group, torch.as_tensor(kl, dtype=torch.float32))
    for (group, side), raw in raws.items():
        watch.raw(group, side, torch.as_tensor(raw, dtype=torch.float32))
    return watch


def test_first_nonfinite_group_and_its_side_are_named():
    raws = {(0, "posterior"): [-1.0, 2.0], (0, "prior"): [-3.0, 0.0],
            (1, "posterior"): [-2.0, 1.0], (1, "prior"): [-80.0, -1.0],
            (2, "posterior"): [0.0, 95.0], (2, "prior"): [0.0, 0.0]}
    where = _watch([[1.0, 2.0], [math.inf, 1.0], [math.nan]], raws).where()
    assert (where["group"], where["label"], where["groups_nonfinite"]) == (1, "block 1", 2)
    assert where["kl"] is None and where["kl_finite"] is False
    assert where["prior"]["raw"] == [-80.0, -1.0] and where["prior"]["log_sigma"] == [-80.0, -1.0]
    assert where["cause"] == "prior sigma underflow"
    assert provenance.origin(where) == "block 1: prior sigma underflow"


def test_largest_kl_named_when_all_finite_and_overflow_through_the_sides_scale():
    raws = {(0, "posterior"): [0.0, 95.0], (1, "posterior"): [0.0, 95.0]}
    where = _watch([[1.0], [3.0, 4.0]], raws).where()
    assert where["group"] == 1 and where["kl"] == 7.0 and where["cause"] == "posterior sigma overflow"
    # the same raw range through UpBounded1: sigma < 1, so nothing overflows
    bounded = _watch([[1.0], [3.0, 4.0]], raws, posterior=UPB).where()
    assert bounded["posterior"]["log_sigma"][1] <= 0 and bounded["cause"] == "largest KL, sigma in range"


def test_ratio_overflow_and_nonfinite_raw_are_causes():
    ratio = _watch([[math.inf]], {(0, "posterior"): [10.0, 30.0], (0, "prior"): [-30.0, -20.0]}).where()
    assert ratio["cause"] == "posterior sigma / prior sigma overflow"
    broken = _watch([[math.nan]], {(0, "prior"): [math.nan, 1.0]}).where()
    assert broken["cause"] == "prior raw scale non-finite" and broken["prior"]["raw"] == [None, None]  # NaN spreads


def test_several_calls_widen_the_range_and_reset_forgets():
    watch = _watch([[1.0]], {(0, "prior"): [-2.0, 1.0]})
    watch.raw(0, "prior", torch.tensor([-5.0, 0.0]))
    assert watch.where()["prior"]["raw"] == [-5.0, 1.0]
    watch.reset()
    assert watch.where() is None


def test_describe_gives_one_line():
    event = {"step": 12, "finite": False, "nonfinite": ["kl"], "reason": "nan",
             "where": {"label": "block 3 (8x8)", "cause": "prior sigma underflow",
                       "prior": {"raw": [-82.0, -3.0]}, "posterior": {"raw": [-1.0, 2.0]}}}
    line = provenance.describe(event)
    assert line == "step 12: kl non-finite at block 3 (8x8): prior sigma underflow (posterior raw -1..2, prior raw -82..-3)"
    assert provenance.describe({"step": 3, "finite": True, "reason": "grad"}) == "step 3: update skipped (grad)"


def _recorder(tmp_path, **kwargs):
    stalls = []
    recorder = StepRecorder(stall_steps=3, on_stall=stalls.append, **kwargs)
    recorder.open(tmp_path / "events.jsonl", rank=0)
    return recorder, stalls


def test_stall_is_three_steps_in_a_row_without_an_update(tmp_path, capsys):
    recorder, stalls = _recorder(tmp_path)
    plan = [(1.0, False), (1.0, True), (None, False), (1.0, False),  # streak broken by step 3
            (1.0, True), (float("nan"), False), (1.0, True), (1.0, True)]
    for step, (loss, skipped) in enumerate(plan):
        recorder.write(step, loss, 1.0, skipped, "grad" if skipped else None, 0.1)
    recorder.close()
    assert stalls == [4] and recorder.stalled_since == 4  # steps 4, 5 (non-finite, applied), 6
    assert "run stalled: no update since step 4" in capsys.readouterr().err
    counts = events.count(events.read(tmp_path), stall_steps=3)
    assert (counts.skip_streak, counts.longest_skip_streak, counts.stalled_since) == (4, 4, 4)
    assert counts.longest_recovered_streak == 2  # steps 1-2, ended by the update at step 3; the trailing 4 never ended
    assert events.count(events.read(tmp_path), stall_steps=5).stalled_since is None


def test_stop_when_stalled_raises_after_writing_the_step(tmp_path):
    recorder, _ = _recorder(tmp_path, stop_when_stalled=True)
    recorder.write(0, 1.0, 1.0, True, "grad", 0.1)
    recorder.write(1, 1.0, 1.0, True, "grad", 0.1)
    with pytest.raises(StopStalled) as stop:
        recorder.write(2, 1.0, 1.0, True, "grad", 0.1)
    recorder.close()
    assert stop.value.since == 0 and "stalled since step 0" in stop.value.status
    assert [e["step"] for e in events.read(tmp_path).events] == [0, 1, 2]


def test_extra_fields_are_strict_json_and_read_back(tmp_path):
    where = {"group": 2, "label": "group 2", "kl": float("inf"), "kl_finite": False, "cause": "prior sigma underflow",
             "prior": {"raw": [float("-inf"), 1.0]}}
    with events.EventWriter(tmp_path / "events.jsonl") as writer:
        writer.write(0, float("nan"), 1.0, True, "nan", 0.1, kl=float("nan"), recon=2.5, nonfinite=["kl"], where=where)
    text = (tmp_path / "events.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (event,) = events.read(tmp_path).events
    assert event["kl"] is None and event["recon"] == 2.5 and event["nonfinite"] == ["kl"]
    assert event["where"]["kl"] is None and event["where"]["prior"]["raw"] == [None, 1.0]
    counts = events.count([event])
    assert counts.nonfinite_origins == {"kl non-finite at group 2: prior sigma underflow": 1}
    assert counts.first_failure.startswith("step 0: kl non-finite at group 2: prior sigma underflow")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_python_json_literals_count_like_null(tmp_path, literal):
    line = (f'{{"step": 4, "rank": 0, "loss": {literal}, "finite": true, "grad_norm": {literal}, '
            '"skipped": true, "reason": "nan", "time": 0.1}\n')
    (tmp_path / "events.jsonl").write_text(json.dumps(dict(step=3, rank=0, loss=1.0, finite=True, grad_norm=1.0,
                                                           skipped=False, reason=None, time=0.1)) + "\n" + line)
    log = events.read(tmp_path)
    assert not log.problems and [e["step"] for e in log.events] == [3, 4]
    assert log.events[1]["loss"] is None and log.events[1]["finite"] is False and log.events[1]["grad_norm"] is None
    assert events.count(log).nan_steps == 1


def test_compare_shows_stalled_runs_and_where_they_broke(tmp_path, capsys):
    run = tmp_path / "up-seed0"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"variant": "upbounded1", "variant_spec": "posterior=upbounded(1)",
                                              "seed": 0, "status": "completed", "stall_steps": 2}))
    where = {"group": 5, "label": "block 5 (16x16)", "cause": "prior sigma underflow", "kl_finite": False,
             "prior": {"raw": [-90.0, -2.0]}}
    with events.EventWriter(run / "events.jsonl") as writer:
        writer.write(0, 1.0, 1.0, False, None, 0.1)
        writer.write(1, None, None, True, "nan", 0.1, nonfinite=["kl"], where=where)
        writer.write(2, None, None, True, "nan", 0.1, nonfinite=["kl"], where=where)
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("| stalled |")
    assert "| 1/1 (since step 1) |" in out
    assert "2 non-finite steps: kl non-finite at block 5 (16x16): prior sigma underflow" in out
    assert "first failure (seed 0): step 1: kl non-finite at block 5 (16x16): prior sigma underflow" in out
    assert compare.main([str(tmp_path), "--format", "json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["stalled"] == {"runs": 1, "since": [1], "longest_recovered_streak": [0]}
    assert summary["nonfinite_origins"] == {"kl non-finite at block 5 (16x16): prior sigma underflow": 2}


def test_gradient_top_names_the_module_that_drove_the_norm():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].weight.grad = torch.full((3, 3), 0.1)
    model[0].bias.grad = torch.zeros(3)
    model[1].weight.grad = torch.full((3, 3), 3.0)
    top = provenance.gradient_top(model.named_parameters(), k=2, depth=1)
    assert [name for name, _, _ in top] == ["1", "0"]
    assert top[0][1] == pytest.approx(9.0) and top[0][2] == pytest.approx(81 / (81 + 0.09))
    model[0].bias.grad = torch.tensor([math.nan, 0.0, 0.0])
    assert provenance.gradient_top(model.named_parameters(), depth=1)[0][:2] == ["0", None]  # non-finite first
    event = {"step": 7, "finite": True, "reason": "grad",
             "where": {"label": "block 2 (4x4)", "cause": "largest KL, sigma in range", "grad_top": [["1", 9.0, 0.93]]}}
    assert provenance.describe(event).endswith("; gradient mostly 1 (93% of its squared norm)")
