"""TensorBoard copies of the per-step events, read back with TensorBoard's own reader (the real package:
CI installs it with .[dev]): the export of a synthetic log, the live path of the step recorder and
of both real launchers, and `vaepatch compare --tensorboard` on a grid."""
import importlib.util
import json
import math
import os
import subprocess

import pytest

from vaepatch import compare
from vaepatch.runs import events
from vaepatch.runs import tensorboard as tb
from vaepatch.runs.recorder import StepRecorder

INSTALL = 'pip install "vaepatch[tensorboard]"'
SCALARS = ["vaepatch/" + name for name in (
    "loss", "kl", "recon", "grad_norm", "step_time", "skipped", "nan_steps", "grad_skips", "amp_skips",
    "nonfinite_loss_steps", "log_sigma/posterior_min", "log_sigma/posterior_max", "log_sigma/prior_min",
    "log_sigma/prior_max")]
TEXT = "vaepatch/failure/text_summary"


@pytest.fixture(autouse=True)
def _tensorboard_installed():
    """Skip without TensorBoard, except in CI, which installs it (.[dev]) and must run these."""
    if tb.available():
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI installs .[dev], which brings TensorBoard, and it is missing ({INSTALL})")
    pytest.skip(f"SKIPPED, needs TensorBoard ({INSTALL})")


def _read(logdir):
    """{tag: {step: value}} for scalars and {step: text} for the failure text, as TensorBoard reads them."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags["scalars"]}
    texts = {}
    if TEXT in tags["tensors"]:
        texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(TEXT)}
    return scalars, texts


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


def _assert_every_scalar_every_step(scalars, steps):
    missing = [tag for tag in SCALARS if tag not in scalars]
    assert not missing, f"tags missing: {missing}; found {sorted(scalars)}"
    for tag in SCALARS:
        assert sorted(scalars[tag]) == list(steps), tag


SCALE = {"posterior": {"raw": [-1.0, 0.5], "log_sigma": [-1.3, 0.47]},
         "prior": {"raw": [-2.0, 1.0], "log_sigma": [-2.1, 0.9]}}
WHERE = {"group": 3, "label": "block 3 (8x8)", "kl": None, "kl_finite": False, "groups_nonfinite": 1,
         "posterior": {"raw": [-5e15, 4e15]}, "prior": {"raw": [-0.5, 0.5], "log_sigma": [-0.6, 0.4]},
         "cause": "posterior raw scale non-finite", "grad_top": [["encoder.in_conv.weight", None, None]]}


def _synthetic_run(path, started="2024-05-01T12:00:00+00:00"):
    """Ten steps of rank 0 (and rank 1's, which the export leaves out): a NaN step skipped, a grad skip,
    an AMP skip, a non-finite loss applied (NVAE's way), a step without a scale record."""
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"target": "vdvae", "variant": "vanilla", "started": started,
                                               "status": "completed", "loss_unit": "nats/dim"}))
    log = path / events.FILENAME
    with events.EventWriter(log, rank=0) as w0, events.EventWriter(log, rank=1) as w1:
        for s in range(10):
            loss, skipped, reason, finite, extra = 5.0 - 0.1 * s, False, None, None, {"kl": 1.0 + s, "recon": 4.0 - s}
            if s == 2:
                loss, skipped, reason, extra = math.nan, True, "nan", {"kl": math.nan, "recon": 2.0,
                                                                       "nonfinite": ["kl"], "where": WHERE}
            elif s == 4:
                skipped, reason = True, "grad"
            elif s == 5:
                skipped, reason = True, "amp"
            elif s == 7:
                loss, finite = math.inf, False
                extra = {"kl": math.inf, "recon": 2.0, "nonfinite": ["kl"], "where": WHERE}
            w0.write(s, loss, 10.0 + s, skipped, reason, 0.5, finite=finite, scale=None if s == 3 else SCALE, **extra)
            w1.write(s, 100.0, 1.0, skipped, reason, 0.5)
    return path


def test_export_writes_every_scalar_every_step_and_the_failures(tmp_path):
    run = _synthetic_run(tmp_path / "run")
    assert tb.export(run, tmp_path / "tb") == 10
    scalars, texts = _read(tmp_path / "tb")
    _assert_every_scalar_every_step(scalars, range(10))
    loss = scalars["vaepatch/loss"]
    assert [round(loss[s], 5) for s in (0, 1, 9)] == [5.0, 4.9, 4.1]  # rank 0's, not rank 1's 100
    assert math.isnan(loss[2]) and math.isnan(loss[7]) and math.isnan(scalars["vaepatch/kl"][2])
    assert scalars["vaepatch/recon"][2] == 2.0 and scalars["vaepatch/kl"][1] == 2.0
    assert scalars["vaepatch/grad_norm"][4] == 14.0 and scalars["vaepatch/step_time"][0] == 0.5
    # cumulative counts, step by step (a NaN step is skipped with reason nan; step 7's was applied)
    expected = {"skipped": [0, 0, 1, 1, 2, 3, 3, 3, 3, 3], "nan_steps": [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
                "grad_skips": [0, 0, 0, 0, 1, 1, 1, 1, 1, 1], "amp_skips": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                "nonfinite_loss_steps": [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]}
    for name, counts in expected.items():
        assert [scalars["vaepatch/" + name][s] for s in range(10)] == counts, name
    assert _same(scalars["vaepatch/log_sigma/posterior_min"][0], -1.3)
    assert _same(scalars["vaepatch/log_sigma/prior_max"][9], 0.9)
    assert math.isnan(scalars["vaepatch/log_sigma/prior_min"][3])  # no scale record that step
    # the failing steps' provenance, and nothing on the others
    assert sorted(texts) == [2, 4, 5, 7]
    assert texts[2].startswith("step 2: kl non-finite at block 3 (8x8): posterior raw scale non-finite")
    assert "encoder.in_conv.weight" in texts[2] and '"group": 3' in texts[2]
    assert texts[4].startswith("step 4: update skipped (grad)") and texts[5].startswith("step 5: update skipped (amp)")
    # wall time: the run's start plus the step times so far
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    first = acc.Scalars("vaepatch/loss")[0].wall_time
    assert first == pytest.approx(1714564800.0 + 0.5)


def test_the_step_recorder_writes_rank_0_steps_live(tmp_path):
    tbdir = tmp_path / "tb"
    for rank in (0, 1):
        recorder = StepRecorder()
        recorder.open(tmp_path / events.FILENAME, rank, tensorboard=tbdir)
        assert (recorder.sink is not None) == (rank == 0)
        for s in range(3):
            recorder.write(s, float(s), 1.0, s == 1, "grad" if s == 1 else None, 0.1, kl=0.5, recon=float(s) - 0.5,
                           scale=SCALE)
        recorder.close()
    scalars, texts = _read(tbdir)
    _assert_every_scalar_every_step(scalars, range(3))
    assert list(scalars["vaepatch/skipped"].values()) == [0, 1, 1] and sorted(texts) == [1]
    assert len(list(tbdir.glob("events.out.tfevents.*.vaepatch"))) == 1  # rank 1 wrote none


def test_without_tensorboard_nothing_is_written_and_the_flag_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tb, "available", lambda: False)
    recorder = StepRecorder()
    recorder.open(tmp_path / events.FILENAME, 0, tensorboard=tmp_path)
    recorder.write(0, 1.0, 1.0, False, None, 0.1)
    recorder.close()
    assert recorder.sink is None and not list(tmp_path.glob("events.out.tfevents.*"))
    _synthetic_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    assert exit_.value.code == 2 and INSTALL in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


def test_compare_exports_a_grid_one_folder_per_run(tmp_path, capsys):
    grid = tmp_path / "grid"
    for cell in ("lr0.1/seed0", "lr0.1/seed1", "lr1/seed0"):
        _synthetic_run(grid / cell)
    out = tmp_path / "tb"
    assert compare.main([str(grid), "--tensorboard", str(out)]) == 0
    assert "3 runs" in capsys.readouterr().err
    for cell in ("lr0.1/seed0", "lr0.1/seed1", "lr1/seed0"):
        scalars, texts = _read(out / cell)
        _assert_every_scalar_every_step(scalars, range(10))
        assert sorted(texts) == [2, 4, 5, 7]
    # a second export into the same folder would show every curve twice: refused, nothing written
    assert compare.main([str(grid), "--tensorboard", str(out)]) == 2
    assert "already holds TensorBoard event files" in capsys.readouterr().err
    assert len(list((out / "lr1/seed0").glob("events.out.tfevents.*"))) == 1
    # run folders given one by one: each under its own name
    two = [str(grid / "lr0.1/seed0"), str(grid / "lr1/seed0")]
    assert compare.main([*two, "--tensorboard", str(tmp_path / "two")]) == 2
    assert "would both export to" in capsys.readouterr().err  # both are called seed0
    assert compare.main([str(grid / "lr0.1"), "--tensorboard", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["seed0", "seed1"]


# The real upstreams: a few steps of each, read back from where the launcher puts the files.

def test_a_real_vdvae_run_leaves_every_scalar_for_every_step(tmp_path, tmp_path_factory):
    from tests import test_vdvae_launch as vdvae

    if vdvae.CLONE is None:
        pytest.skip(f"SKIPPED, needs a real clone: {vdvae.WHY_NOT}")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("SKIPPED, needs mpi4py (pip install 'vaepatch[mpi]') to run VDVAE's train.py")
    from vaepatch import cifar_format

    data = cifar_format.make(tmp_path_factory.mktemp("cifar"), n_train=cifar_format.VALIDATION_HOLDOUT + 8 * 5,
                             n_test=8)
    out = tmp_path / "run"
    result = subprocess.run(vdvae._command(out, data, max_steps=3), env=vdvae.ENV, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(out.glob("events.out.tfevents.*.vaepatch"))) == 1  # in the run's out folder
    scalars, _ = _read(out)
    _assert_every_scalar_every_step(scalars, range(3))
    logged = events.read(out).events
    assert [scalars["vaepatch/loss"][e["step"]] for e in logged] == pytest.approx([e["loss"] for e in logged])
    assert all(math.isfinite(scalars["vaepatch/log_sigma/prior_min"][s]) for s in range(3))


def test_a_real_nvae_run_writes_into_nvae_own_summary_folder(tmp_path, tmp_path_factory):
    from tests import test_nvae_launch as nvae

    if nvae.CLONE is None:
        pytest.skip(f"SKIPPED, needs a real clone: {nvae.WHY_NOT}")
    from vaepatch import cifar_format

    data = cifar_format.make(tmp_path_factory.mktemp("cifar"), n_train=8 * nvae.STEPS_PER_EPOCH, n_test=4,
                             for_target="nvae")
    out = tmp_path / "run"
    result = nvae._run(out, data, variant="upbounded1", launcher=["--max-steps", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = out / "nvae" / "eval-t"  # NVAE's --root/eval---save, where its own SummaryWriter writes
    assert json.loads((out / "run.json").read_text())["upstream_logdir"] == str(summaries)
    assert len(list(summaries.glob("events.out.tfevents.*.vaepatch"))) == 1
    assert not list(out.glob("events.out.tfevents.*"))
    scalars, _ = _read(summaries)
    _assert_every_scalar_every_step(scalars, range(3))
    logged = events.read(out).events
    assert [scalars["vaepatch/loss"][e["step"]] for e in logged] == pytest.approx([e["loss"] for e in logged])
    assert [scalars["vaepatch/kl"][e["step"]] for e in logged] == pytest.approx([e["kl"] for e in logged])
    assert all(math.isfinite(scalars["vaepatch/log_sigma/posterior_max"][s]) for s in range(3))
