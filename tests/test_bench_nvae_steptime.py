"""`vaepatch bench nvae-step-time`: the real NVlabs/NVAE's training step, patched / vanilla.

The runs that import NVAE go in a subprocess: NVAE's top-level modules (``utils``, ``model``,
...) clash with openai/vdvae's, which other tests import in this process. Nothing here asserts
a time; the checks are that the bench compares what it says it compares (same start, vanilla
really unpatched, the variant really patched) and prints a row per variant.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vaepatch import upstream
from vaepatch.targets.nvae import steptime as nvae_steptime
from tests.nvae_support import require_nvae

REPO = Path(__file__).resolve().parents[1]


def _python(args, clone):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           upstream.pin("nvae").env: str(clone)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


MEASURE = """
import json
from vaepatch.targets.nvae.steptime import measure
print(json.dumps({v: measure(v, steps=2, warmup=0, threads=1)["losses"] for v in ("vanilla", "upbounded1", "explin")}))
"""


def test_same_start_vanilla_unpatched_variant_patched():
    """Round i of both models sees the same weights (round 0), batch and noise; so with the
    'vanilla' variant both models' losses are equal, the vanilla side is the same whatever the
    variant (the patch is off for it), and a variant with other scales changes the patched loss."""
    proc = _python(["-c", MEASURE], require_nvae())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(math.isfinite(v) for run in losses.values() for side in run.values() for v in side)
    assert all(len(side) == 2 for run in losses.values() for side in run.values())
    assert losses["vanilla"]["patched"] == losses["vanilla"]["vanilla"]  # same weights, batch, noise, code
    for variant in ("upbounded1", "explin"):
        assert losses[variant]["vanilla"][0] == losses["vanilla"]["vanilla"][0]  # vanilla step: patch reverted
        assert losses[variant]["patched"][0] != losses[variant]["vanilla"][0]  # patched step: patch applied
    assert losses["upbounded1"]["patched"][0] != losses["explin"]["patched"][0]


def test_quick_run_prints_a_ratio_row_per_variant():
    variants = ["upbounded1", "explin", "upbounded1-cst1"]
    proc = _python(["-m", "vaepatch", "bench", "nvae-step-time", "--quick", "--threads", "1", "--fuse", "off",
                    "--variants", ",".join(variants)], require_nvae())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["variant", "fused", "vanilla", "ms", "patched"], proc.stdout
    assert "(median of 2 interleaved rounds after 1 warm-up, 1 threads; per-round ratios" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:1 + len(variants)]}
    assert list(rows) == variants, proc.stdout
    for fused, *cells in rows.values():
        assert fused == "no"  # --fuse off: eager rows only
        vanilla_ms, patched_ms, ratio, q1, q3 = (float(c.strip("[],")) for c in cells)
        assert all(math.isfinite(v) and v > 0 for v in (vanilla_ms, patched_ms, ratio))
        assert q1 - 1e-3 <= ratio <= q3 + 1e-3  # the median of the per-round ratios, within their quartiles
    assert "num_mixture_dec 10" in proc.stdout and "patched - vanilla" in proc.stdout


FUSED = """
import json
from vaepatch.targets.nvae.steptime import measure
print(json.dumps([row["losses"] for row in measure("qfloor-cst1", steps=2, warmup=1, threads=1, fuse=[False, True])]))
"""


def test_fused_rows_time_the_compiled_patch_against_the_same_vanilla():
    """``fuse=[False, True]``: one row each, timed in the same rounds against one vanilla model; the fused
    model is really patched (its loss differs from vanilla's) and computes the eager numbers. qfloor-cst1: its
    posterior form returns contiguous tensors from NVAE's channels_last heads; unless the head map restores
    the layout, the convolutions after it round differently and the loss moves by ~4e-5 of itself."""
    proc = _python(["-c", FUSED], require_nvae())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch.compile of the fused block math failed" not in proc.stderr
    eager, fused = json.loads(proc.stdout.strip().splitlines()[-1])
    assert eager["vanilla"] == fused["vanilla"] and len(fused["patched"]) == 3
    assert fused["patched"][0] != fused["vanilla"][0]
    assert fused["patched"] == pytest.approx(eager["patched"], rel=1e-6)


def test_unknown_variant_is_a_clear_error_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr(nvae_steptime, "measure", lambda *a, **k: pytest.fail("measure ran"))
    assert nvae_steptime.main(["--quick", "--variants", "upbounded1,upbounded7x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaepatch bench nvae-step-time: ") and "upbounded7x" in err
    assert "upbounded1" in err and "Traceback" not in err  # lists what is accepted


def test_no_clone_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(upstream, "locate", lambda name, where=None: None)
    path_before = list(sys.path)
    assert nvae_steptime.main(["--quick", "--variants", "upbounded1"]) == 2
    err = capsys.readouterr().err
    assert "no nvae clone found" in err and "run: vaepatch fetch nvae" in err
    assert sys.path == path_before  # nothing put on the path, nothing imported


def test_a_missing_explicit_clone_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-nvae-here"
    proc = _python(["-m", "vaepatch", "bench", "nvae-step-time", "--quick"], missing)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and str(missing) in proc.stderr
    assert "vaepatch fetch nvae" in proc.stderr
