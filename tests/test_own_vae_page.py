"""docs/own-vae.md and the README's plain-PyTorch snippet: the code a reader sees is the code run here.

The page's script trains a two-level VAE on the real MNIST file twice (a naive latent Normal, then
vaepatch's StableNormal); this runs it as printed and checks what the page claims: the naive run hits
NaN, the stable one does not and its loss goes down. Exact numbers are not compared: they depend on
the CPU's floating-point kernels.
"""
from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from vaepatch.mnist import ENV

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "own-vae.md"
README = REPO / "README.md"
REAL_MNIST = Path(os.environ.get(ENV) or REPO.parent / "shared" / "data" / "mnist_test10k.npz")
needs_mnist = pytest.mark.skipif(not REAL_MNIST.is_file(),
                                 reason=f"real MNIST file {REAL_MNIST} absent (set ${ENV})")


def _blocks(text, lang):
    """The bodies of the fenced ```lang blocks of a markdown text, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.S | re.M)


def _page_script():
    scripts = [b for b in _blocks(PAGE.read_text(), "python") if '__name__ == "__main__"' in b]
    assert len(scripts) == 1, "the page shows exactly one script (the block with a __main__ part)"
    return scripts[0]


def _rows(output):
    """{form: (first NaN/inf column, loss at step 1, mean loss of the last 20 steps)} from the script's table."""
    rows = {}
    for line in output.splitlines()[1:]:
        m = re.match(r"(\w+)\s+(step \d+|no NaN)\s+(\S+)\s+.*\s(\S+)$", line)
        assert m, f"unexpected output line {line!r}"
        rows[m[1]] = (m[2], float(m[3]), float(m[4]))
    return rows


@needs_mnist
def test_the_pages_script_nans_naive_and_trains_stable(tmp_path):
    script = tmp_path / "own_vae.py"
    script.write_text(_page_script())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), str(REAL_MNIST)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = _rows(done.stdout)
    assert set(rows) == {"naive", "stable"}
    assert rows["naive"][0].startswith("step ") and math.isnan(rows["naive"][2])
    verdict, start, end = rows["stable"]
    assert verdict == "no NaN" and math.isfinite(end) and end < 0.5 * start
    shown = _rows(_blocks(PAGE.read_text(), "text")[0])  # the output the page prints: same verdicts
    assert {k: v[0].split()[0] for k, v in shown.items()} == {k: v[0].split()[0] for k, v in rows.items()}


def test_the_pages_other_snippets_run():
    """Every other python block on the page runs as shown (the KL-gradient comparison)."""
    others = [b for b in _blocks(PAGE.read_text(), "python") if '__name__ == "__main__"' not in b]
    assert others
    for block in others:
        out = io.StringIO()
        with redirect_stdout(out):
            exec(compile(block, str(PAGE), "exec"), {})
        lines = out.getvalue().splitlines()
        assert "-inf" in lines[0] and "inf" not in lines[1] and "nan" not in lines[1]


def test_the_pages_seed_sweep_uses_only_what_the_script_defines():
    """The sweep (minutes, so not run here) compiles, and imports only names the page's script has."""
    sweeps = [b for b in _blocks(PAGE.read_text(), "bash") if "<<'EOF'" in b]
    assert len(sweeps) == 1
    code = sweeps[0].split("<<'EOF'\n", 1)[1].rsplit("EOF", 1)[0]
    compile(code, "sweep", "exec")
    names = re.search(r"from own_vae import (.*)", code)[1].split(", ")
    script = {"__name__": "own_vae"}
    exec(compile(_page_script(), "own_vae.py", "exec"), script)  # defines; __main__ part does not run
    assert all(name in script for name in names), names


def test_the_readme_quickstart_snippet_runs():
    blocks = [b for b in _blocks(README.read_text(), "python") if "StableNormal" in b]
    assert len(blocks) == 1, "the README's Quickstart shows one plain-PyTorch block"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    kl = namespace["kl"]
    assert kl.shape == namespace["z"].shape[:1] and bool(kl.isfinite().all())
