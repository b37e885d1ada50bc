"""`vaepatch bench numerics`: the paper's Table 1 reproduced, and the range sweep."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaepatch.bench.reparam import numerics

REPO = Path(__file__).resolve().parents[1]


# Dehaene & Brossard, Table 1 (PAPERS.md): the smallest log sigma_1 whose KL to N(0, 1) is finite, and sigma_1
@pytest.mark.parametrize("dtype,impl,expected,sigma", [
    ("float32", "naive_exp", -103, 1.85e-45),
    ("float32", "pytorch", -51, 7.10e-23),
    ("float16", "naive_exp", -17, 4.14e-08),
    ("float16", "pytorch", -8, 3.35e-04),
])
def test_table1_matches_paper(dtype, impl, expected, sigma):
    row = numerics.smallest_finite_log_scale(impl, dtype)
    assert row["smallest_log_sigma"] == expected
    assert numerics.PAPER[(dtype, impl)] == (expected, sigma)  # what the bench prints as "paper"
    # sigma = e^l, as the paper prints it (3 significant digits)
    assert row["sigma"] == pytest.approx(sigma, rel=5e-3)
    assert row["finite_over_walk"] is False and row["finite_at_dtype_min"] is None
    # the gradient gives out no later than the value
    assert row["smallest_log_sigma_grad"] >= row["smallest_log_sigma"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_vaepatch_kl_finite_to_dtype_minimum(dtype):
    row = numerics.smallest_finite_log_scale("vaepatch", dtype)
    assert row["finite_over_walk"] is True
    assert row["smallest_log_sigma"] == -200 and row["smallest_log_sigma_grad"] == -200
    assert row["finite_at_dtype_min"] == float(torch.finfo(numerics.DTYPES[dtype]).min)
    # and it beats both baselines in this dtype
    for impl in ("naive_exp", "pytorch"):
        other = numerics.smallest_finite_log_scale(impl, dtype)
        assert other["finite_over_walk"] is False and other["smallest_log_sigma"] > -200


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("param", [p for p in numerics.PARAMETERIZATIONS if p != "naive_exp"])
def test_sweep_has_no_failures(param, dtype):
    row = numerics.sweep(param, dtype, points=100)
    assert row["kl_checked"] > 100 and row["grad_checked"] > 100  # it did check something
    assert row["kl_nonfinite"] == 0, row
    assert row["grad_nonfinite"] == 0, row
    lo, hi = row["finite_output_range"]
    # every stable map has finite outputs down to the dtype's most negative p
    assert lo == float(torch.finfo(numerics.DTYPES[dtype]).min)
    assert hi > 5


def test_sweep_shows_naive_exp_failing_in_float16():
    row = numerics.sweep("naive_exp", "float16", points=100)
    assert row["grad_nonfinite"] > 0, row
    # and its finite range is a sliver of the dtype's
    lo, hi = row["finite_output_range"]
    assert lo > -20 and hi < 12
    stable = numerics.sweep("upbounded(1)", "float16", points=100)
    assert stable["grad_nonfinite"] == 0 and stable["grad_checked"] > row["grad_checked"]


def test_sweep_covers_every_parameterization():
    from vaepatch import scales

    covered = {scales.get(p).name for p in numerics.PARAMETERIZATIONS}
    assert covered == set(scales.names())


def test_main_json(capsys):
    rc = numerics.main(["--dtypes", "float32,float16", "--points", "30", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["failures"] == 0
    assert {(r["dtype"], r["implementation"]) for r in out["table1"]} == {
        (d, i) for d in ("float32", "float16") for i in ("naive_exp", "pytorch", "vaepatch")}
    assert len(out["sweep"]) == 2 * len(numerics.PARAMETERIZATIONS)


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "vaepatch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bench_numerics():
    proc = _run("bench", "numerics", "--dtypes", "float32", "--points", "50")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for word in ("naive_exp", "pytorch", "vaepatch", "Table 1", "-103", "-51", "upbounded(1)"):
        assert word in out, out
    table1_text = out.split("\n\n")[0]  # Table 1 comes first, then a blank line, then the sweep
    table1 = [line.split() for line in table1_text.splitlines() if line.startswith("float32")]
    assert len(table1) == 3
    measured = {row[1]: row[2] for row in table1 if row[1] in ("naive_exp", "pytorch")}
    assert measured == {"naive_exp": "-103", "pytorch": "-51"}
    assert out.rstrip().endswith(": 0")  # the failure count line


def test_cli_unknown_bench_and_dtype():
    proc = _run("bench", "nope")
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "available" in proc.stderr and "numerics" in proc.stderr
    proc = _run("bench", "numerics", "--dtypes", "float8")
    assert proc.returncode != 0 and "float8" in proc.stderr and "float32" in proc.stderr
