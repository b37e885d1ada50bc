"""`vaepatch demo --quick` end to end: one run directory per encoder x seed, in the launcher's format."""
import json
import re

from vaepatch import compare, demo
from vaepatch.runs import events

KEYS = {"target", "variant", "variant_spec", "upstream_commit", "vaepatch_version", "seed", "argv", "host",
        "started", "status", "ended"}


def test_quick_demo_writes_launcher_format_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--quick", "--out", str(out)]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    run_dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in run_dirs] == sorted(f"{e}-seed{s}" for e in demo.ENCODERS for s in (0, 1))
    specs = {}
    for run_dir in run_dirs:
        manifest = json.loads((run_dir / "run.json").read_text())
        assert KEYS <= set(manifest)
        encoder, seed = run_dir.name.rsplit("-seed", 1)
        assert manifest["target"] == "conv-vae-overfit" and manifest["seed"] == int(seed)
        assert manifest["variant"] == f"encoder={encoder},decoder={demo.DECODER}"
        assert manifest["upstream_commit"] is None and manifest["argv"] == argv and manifest["ended"]
        specs.setdefault(encoder, set()).add(manifest["variant_spec"])

        log = events.read(run_dir)
        assert not log.problems and not log.duplicates
        steps = [e["step"] for e in log.events]
        assert steps == list(range(len(steps)))  # one event per step, none missing
        failed = [e for e in log.events if e["skipped"]]
        status = manifest["status"]
        if status.startswith("failed"):
            # the run stops at its first NaN step, which is the last event and the one in the status
            assert failed == [log.events[-1]] and failed[0]["reason"] == "nan"
            assert status == f"failed: NaN at step {steps[-1]}"
        else:
            assert status in ("completed", "diverged")
            assert not failed and len(steps) == 40 and all(e["finite"] for e in log.events)
        assert all(e["rank"] == 0 and e["time"] >= 0 for e in log.events)
        run = compare.load_run(run_dir)
        assert not run.problems and run.counts.nan_steps == len(failed)
    assert all(len(s) == 1 for s in specs.values()) and len(set().union(*specs.values())) == 4  # a variant per encoder
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    for encoder in demo.ENCODERS:  # the per-variant table
        assert re.search(rf"\| encoder={encoder},decoder={demo.DECODER} \| 2 \|", printed)
    # the demo's claim: the naive log(exp(p)) encoder hits NaN (within 40 steps, seeds 0 and 1), the
    # exact-log encoders do not
    statuses = {d.name: json.loads((d / "run.json").read_text())["status"] for d in run_dirs}
    for seed in (0, 1):
        assert statuses[f"naive_exp-seed{seed}"].startswith("failed: NaN at step")
        assert statuses[f"explin-seed{seed}"] == statuses[f"upbounded1-seed{seed}"] == "completed"
    assert "naive_exp: 2/2 hit NaN" in printed and "explin: 0/2 hit NaN" in printed
    assert "upbounded1: 0/2 hit NaN" in printed
    header = next(line for line in printed.splitlines() if line.startswith("| variant |"))
    assert "eval loss" not in header and "AMP skips" not in header  # columns empty in every row left out
    assert "NaN steps" in header and "end loss" in header
