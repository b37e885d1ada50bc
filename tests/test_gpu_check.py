"""The GPU check (`vaepatch bench gpu`, run_scripts/gpu_check.sh).

Without clones (CI): the budget, the atomic JSON + Markdown writer, the run-directory checks on
synthetic events, the config, a section stopped at its time or failing, and the OU section on the MLP.
With both clones, mpi4py and mpiexec: the whole --dry-run through the shell script, as on the GPU.
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vaepatch.bench import gpu
from vaepatch.bench.gpu import report as gpu_report, runs as gpu_runs, state as gpu_state
from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest
from tests.nvae_support import nvae_clone
from tests.vdvae_support import vdvae_clone

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


# -- clone-free ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_budget_allots_what_is_left_up_to_the_cap_and_skips_what_no_longer_fits():
    clock = FakeClock()
    budget = gpu_state.Budget(100, reserve_s=5, clock=clock)
    assert budget.allot(cap_s=30, min_s=10) == (30, "")
    clock.t += 70  # 30 s left, 5 kept back for the report
    assert budget.left() == pytest.approx(30) and budget.elapsed() == pytest.approx(70)
    assert budget.allot(cap_s=60, min_s=10) == (pytest.approx(25), "")
    clock.t += 20
    seconds, why = budget.allot(cap_s=60, min_s=10)
    assert seconds is None and "needs at least 10 s, 5 s left of --budget-s 100" in why
    clock.t += 50
    assert budget.allot(cap_s=60, min_s=1)[1].endswith("0 s left of --budget-s 100")


def test_atomic_writer_leaves_whole_strict_json_and_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    gpu_state.write_atomic(path, gpu_state.dumps({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": 2}}))
    gpu_state.write_atomic(path, gpu_state.dumps({"a": float("nan"), "b": [1.5, float("-inf")], "c": {"d": 3}}))
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON")) == \
        {"a": None, "b": [1.5, None], "c": {"d": 3}}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    assert gpu_state.read_json(tmp_path / "missing.json") is None
    (tmp_path / "half.json").write_text('{"a": ')
    assert gpu_state.read_json(tmp_path / "half.json") is None


def _synthetic_run(out: Path, reasons, device="cuda", status=None, steps=None):
    """A launcher-like run directory: run.json + one event per step with the given skip reasons."""
    steps = len(reasons) if steps is None else steps
    out.mkdir(parents=True)
    run_manifest.write(out / "run.json", {"target": "nvae", "device": device, "world_size": 1,
                                          "status": status or f"stopped at --max-steps {steps}",
                                          "compat": [{"name": "tensorboardx-stub", "fixes": "x"}]})
    with events.EventWriter(out / "events.jsonl") as writer:
        for step, reason in enumerate(reasons):
            loss = float("nan") if reason == "nan" else 100.0 - step
            writer.write(step, loss, 1.0, reason is not None, reason, 0.01 * (step + 1))


def test_check_run_counts_amp_and_nan_from_events_and_checks_the_manifest(tmp_path):
    reasons = [None, "amp", "amp", None, "nan", None, "amp", None]
    _synthetic_run(tmp_path / "r", reasons)
    checked = gpu_runs.check_run(tmp_path / "r", steps=8, device="cuda", warmup=2)
    assert checked["ok"], checked["problems"]
    assert (checked["events"], checked["steps"], checked["amp_skips"], checked["nan_steps"], checked["skipped"]) == \
        (8, 8, 3, 1, 4)
    assert checked["first_nan_step"] == 4 and checked["amp_skip_steps"] == [1, 2, 6]
    assert checked["median_step_s"] == pytest.approx(0.055) and checked["timed_steps"] == 6  # steps 2..7
    assert checked["compat"] == ["tensorboardx-stub"] and checked["last_loss"] == 93.0
    wrong = gpu_runs.check_run(tmp_path / "r", steps=10, device="cpu")
    assert not wrong["ok"]
    assert any("status" in p for p in wrong["problems"]) and any("device 'cuda'" in p for p in wrong["problems"])
    assert any("expected steps 0..9" in p for p in wrong["problems"])
    empty = gpu_runs.check_run(tmp_path / "nothing", steps=3, device="cuda")
    assert not empty["ok"] and empty["events"] == 0


def _args(*argv):
    return gpu._parser().parse_args(list(argv))


def test_config_sizes_variants_and_the_best_margin_variant(tmp_path, monkeypatch):
    cfg = gpu.config(_args("--work", str(tmp_path)), "cuda")
    vdvae = cfg["sections"]["vdvae-step-time"]
    assert vdvae["size"] == "cifar10" and vdvae["steps"] >= 20
    assert {(v, f) for v, f in vdvae["configs"]} == {(v, f) for v in ("upbounded1", "explin-cst1") for f in (False, True)}
    assert cfg["sections"]["nvae-amp"]["variants"] == ["vanilla", "upbounded1-cst1", "upbounded1-floor"]
    assert cfg["sections"]["nvae-amp"]["steps"] >= 200 and cfg["threads"] is None
    monkeypatch.setattr(gpu, "BEST_MARGIN_VARIANT", "posterior=upbounded(1),prior=cst1")
    cfg = gpu.config(_args("--dry-run", "--work", str(tmp_path)), "cpu")
    assert cfg["sections"]["nvae-amp"]["variants"] == ["vanilla", "upbounded1-cst1", "posterior=upbounded(1),prior=cst1"]
    assert cfg["sections"]["vdvae-step-time"]["size"] == "tiny" and cfg["threads"] == 1
    cfg = gpu.config(_args("--variants", "vanilla;upbounded1,ou=0.9x5", "--nvae-lr", "0.1", "--nvae-steps", "50",
                           "--work", str(tmp_path)), "cuda")
    assert cfg["sections"]["nvae-amp"]["variants"] == ["vanilla", "upbounded1,ou=0.9x5"]
    assert (cfg["sections"]["nvae-amp"]["lr"], cfg["sections"]["nvae-amp"]["steps"]) == (0.1, 50)
    assert gpu.BUDGET_S[False] <= 480  # the check fits 8 minutes


def test_markdown_renders_every_state_of_every_section():
    rows = [{"variant": "upbounded1", "fuse": False, "vanilla_s": 0.1, "patched_s": 0.11, "ratio": 1.1,
             "memory": {"vanilla": {"peak_bytes": 2**30, "step_bytes": 2**29}, "patched": {"peak_bytes": 2**30 + 2**20,
                                                                                            "step_bytes": 2**29}}},
            {"variant": "upbounded1", "fuse": True, "error": "RuntimeError: boom"}]
    report = {"dry_run": False, "budget_s": 450, "elapsed_s": 12, "finished": False, "sections": {
        "preflight": {"status": "ok", "seconds": 3, "result": {"gpu": "NVIDIA H200", "gpu_memory_gib": 140.0,
                                                                "capability": "9.0", "problems": ["no git on PATH"]}},
        "vdvae-step-time": {"status": "failed", "seconds": 50, "result": {"device": "cuda", "size": "cifar10",
                                                                           "rows": rows}},
        "nvae-amp": {"status": "timeout", "seconds": 150, "error": "stopped after 150 s",
                     "result": {"rows": [{"variant": "vanilla", "amp_skips": 4, "ok": True}]}},
        "launcher": {"status": "error", "error": "KeyError: 'steps'", "result": {}},
        "ou-cost": {"status": "skipped", "note": "skipped: needs at least 15 s, 3 s left of --budget-s 450"}}}
    assert {s["status"] for s in report["sections"].values()} <= set(gpu_state.STATUSES)
    text = gpu_report.render_markdown(report)
    assert "NVIDIA H200" in text and "cut short" in text and "no git on PATH" in text
    assert "| upbounded1 | eager | 100.0 | 110.0 | 1.100 | 1024.0 | 1025.0 |" in text
    assert "error: RuntimeError: boom" in text and "KeyError: 'steps'" in text and "3 s left of --budget-s 450" in text
    for name in ("preflight", "vdvae-step-time", "nvae-amp", "launcher", "ou-cost"):
        assert f"| {name} |" in text


def test_a_section_past_its_time_is_stopped_and_a_failing_one_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "POLL_S", 0.2)
    cfg = gpu.config(_args("--dry-run", "--work", str(tmp_path / "w")), "cpu")
    cfg["sections"]["ou-cost"].update(references=["mlp"], steps=10_000)  # far more than 1 s
    del cfg["sections"]["nvae-amp"]["steps"]  # a section that fails at once
    config_path = tmp_path / "w" / "config.json"
    gpu_state.write_atomic(config_path, gpu_state.dumps(cfg))
    check = gpu.Check(tmp_path / "out", tmp_path / "w", {"sections": {}})
    budget = gpu_state.Budget(60)
    slow = gpu.run_section(check, "ou-cost", 60.0, config_path, budget, ENV, kill_after=4.0)  # told 60 s, stopped at 4
    assert slow["status"] == "timeout" and "what it had measured is kept" in slow["error"]
    assert 4 <= slow["seconds"] < 20
    assert (tmp_path / "out" / gpu.REPORT).exists()  # merged into the report while it ran
    failing = gpu.run_section(check, "nvae-amp", 30.0, config_path, budget, ENV)
    assert failing["status"] == "error" and "KeyError" in failing["error"]


def test_ou_section_on_the_mlp_without_clones_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "out"
    # no git and no mpiexec on PATH (the sections' interpreter is named by its path): the preflight fails, wherever
    # this runs, so the check must exit 1 although the OU section (on the MLP only: no clone) is ok
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setitem(gpu.DRY_RUN["ou-cost"], "references", ["mlp"])
    code = gpu.main(["--dry-run", "--device", "cpu", "--sections", "ou-cost,preflight", "--out", str(out),
                     "--work", str(tmp_path / "w")])
    report = json.loads((out / gpu.REPORT).read_text())
    assert report["finished"] and list(report["sections"]) == ["ou-cost", "preflight"]
    assert report["sections"]["ou-cost"]["status"] == "ok" and report["sections"]["preflight"]["status"] == "failed"
    assert "no git on PATH" in " ".join(report["sections"]["preflight"]["result"]["problems"])
    assert code == 1
    rows = report["sections"]["ou-cost"]["result"]["rows"]
    mlp = [r for r in rows if r["reference"].startswith("MLP")]
    assert [r["config"] for r in mlp] == ["plain", "OU K=5"]
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in mlp for k in ("time_ratio", "memory_ratio", "flop_ratio"))
    assert mlp[1]["flop_ratio"] > 1.5 and mlp[1]["memory_ratio"] > 1.5  # K = 5 copies through the prior nets
    assert "## ou-cost" in (out / gpu.MARKDOWN).read_text()


def test_budget_too_small_skips_every_section_and_says_so(tmp_path):
    out = tmp_path / "out"
    assert gpu.main(["--dry-run", "--device", "cpu", "--budget-s", "3", "--out", str(out)]) == 1
    report = json.loads((out / gpu.REPORT).read_text())
    assert {s["status"] for s in report["sections"].values()} == {"skipped"}
    assert all("left of --budget-s 3" in s["note"] for s in report["sections"].values())
    assert (tmp_path / "out" / "work" / "config.json").exists()


def test_run_nvae_wrapper_usage():
    assert gpu_runs.main([]) == 2 and gpu_runs.main(["run-vdvae"]) == 2


def test_run_nvae_wrapper_reads_the_crops_where_torchvision_would_download(monkeypatch, tmp_path):
    """With a real torchvision (the GPU machine's), NVAE's CIFAR10(download=True) would reject make-data's
    files by md5 and try to download; the wrapper puts vaepatch's reader in its place."""
    import types

    from vaepatch import cifar_format
    from vaepatch.targets.nvae.shims import Cifar10Reader

    class DownloadingCIFAR10:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Dataset not found or corrupted (md5), and no network")

    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = DownloadingCIFAR10
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    gpu_runs._offline_cifar10()
    assert datasets.CIFAR10 is Cifar10Reader
    root = cifar_format.make(tmp_path, n_train=10, n_test=2, for_target="nvae")
    assert len(datasets.CIFAR10(root=str(root), train=True, download=True)) == 10


# -- the dry run, as on the GPU machine (needs both clones, mpi4py and mpiexec) ------------------
def _why_not_dry_run():
    for clone, why in (vdvae_clone(), nvae_clone()):
        if clone is None:
            return why
    if importlib.util.find_spec("mpi4py") is None:
        return "no mpi4py (pip install 'vaepatch[mpi]')"
    if shutil.which("mpiexec") is None:
        return "no mpiexec (pip install mpich)"
    return None


@pytest.mark.skipif(_why_not_dry_run() is not None, reason=f"SKIPPED, the GPU check's dry run needs: {_why_not_dry_run()}")
def test_dry_run_of_the_gpu_check_script(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # --budget-s 200: the default (115 s) fits an idle 2-core machine; a shared one may need more
    done = subprocess.run(["bash", str(REPO / "run_scripts" / "gpu_check.sh"), "--dry-run", "--device", "cpu",
                           "--budget-s", "200", "--out", str(out), "--work", str(work)],
                          env=dict(ENV, PYTHON=sys.executable), capture_output=True, text=True, timeout=300)
    report = json.loads((out / gpu.REPORT).read_text())
    statuses = {name: s["status"] for name, s in report["sections"].items()}
    assert done.returncode == 0, (statuses, done.stdout[-3000:], done.stderr[-3000:])
    assert list(statuses) == list(gpu.SECTIONS) and set(statuses.values()) == {"ok"} and report["finished"]
    sections = {name: s["result"] for name, s in report["sections"].items()}
    cfg = report["config"]

    assert sections["preflight"]["clones"]["vdvae"].endswith("clean") and sections["preflight"]["ok"]
    vdvae = sections["vdvae-step-time"]["rows"]
    assert [(r["variant"], r["fuse"]) for r in vdvae] == [tuple(c) for c in cfg["vdvae-step-time"]["configs"]]
    for r in vdvae:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["vanilla_s"] > 0 and r["patched_s"] > 0
        assert r["memory"]["vanilla"]["saved_bytes"] > 0 and r["memory"]["patched"]["saved_bytes"] > 0
        assert not r["warnings"], r["warnings"]  # a fused row that fell back to eager would say so here

    amp = sections["nvae-amp"]
    assert [r["variant"] for r in amp["rows"]] == cfg["nvae-amp"]["variants"]
    for r in amp["rows"]:
        log = events.read(work / "runs" / "nvae-amp" / gpu_runs_safe(r["variant"]))
        counts = events.count(log)
        assert r["events"] == len(log.events) == r["steps"] == counts.steps == amp["steps"]
        assert (r["amp_skips"], r["nan_steps"]) == (counts.amp_skips, counts.nan_steps) == (0, 0)  # CPU: no AMP
        assert math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0

    launcher = sections["launcher"]["runs"]
    assert launcher["vdvae"]["command_head"].startswith("mpiexec -n 1 ")
    for name, r in launcher.items():
        assert r["ok"] and r["events"] == r["steps"] == sections["launcher"]["steps"], (name, r)
        assert r["status"] == f"stopped at --max-steps {sections['launcher']['steps']}" and "cpu-gloo" in r["compat"]

    ou = sections["ou-cost"]["rows"]
    assert [r["config"] for r in ou] == ["plain", "OU K=5"] * 2
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in ou for k in ("time_ratio", "memory_ratio", "flop_ratio"))

    assert "## launcher" in (out / gpu.MARKDOWN).read_text()
    with tarfile.open(out / gpu.ARCHIVE) as tar:
        names = tar.getnames()
    assert "runs/launcher/vdvae/events.jsonl" in names and "runs/nvae-amp/vanilla/run.json" in names


def gpu_runs_safe(name):
    from vaepatch.bench.gpu.sections import _safe

    return _safe(name)
