"""`vaepatch bench stability-margin`: up to which learning rate does each variant still train?

The real upstream (VDVAE by default, ``--target nvae`` or ``effvdvae``) through ``vaepatch run TARGET --cpu`` on a
tiny configuration, per variant x learning rate x seed, for ``--steps`` steps (any configuration:
upstream flags after ``--`` are appended and win), under each ``--skip`` policy: ``upstream`` (the
upstream's own rule: VDVAE skips an update whose gradient norm exceeds 400) and ``off`` (VDVAE's
``--skip_threshold -1``; a step with a NaN loss is still not applied, one with an infinite loss then
is). NVAE has no skip rule. Efficient-VDVAE skips an update whose gradient norm is NaN or at least 800;
``off`` is its ``optimizer.gradient_skip=False``, which then applies every step.

Each run is judged by where it ends, the way its upstream trains it (``vaepatch.runs.verdict``): a
step the upstream does not apply (VDVAE skips a NaN loss; NVAE's grad scaler a non-finite gradient) is
counted, not failed. A run fails on a stall (its last ``--stall-steps`` steps had no update: it is
stopped there), when most of its last 10% of steps were not applied, when its weights end non-finite,
or when it ends untrained (its end NELBO, the median of recon + KL over its last 10% of steps, not
below its first step's); spikes, NaN steps and skips are counted beside every verdict. A cell passes
when every seed passed; a variant's margin is the largest rate that passed below its lowest failing
one, and its ratio that margin over vanilla's under the same policy. Beside every verdict: the end
NELBO of the passing runs, so a higher rate that reaches a worse model shows.

By default only the cells that decide each margin are run: each (variant, policy) starts at
``--start``, steps one grid rate down while the cell fails and up while it passes, until a passing
rate sits below a failing one; ``--every-cell`` runs the whole grid. ``--stop-at-nonfinite`` (smoke
runs only) stops each run at its first non-finite loss and fails it there: harsher than the upstream,
which trains on. Rerunning skips finished runs, so a long grid survives interruption and grows: add
rates, seeds or variants and rerun.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vaepatch.bench import fill_defaults, no_clone
from vaepatch.bench.margin import report
from vaepatch.runs import manifest as run_manifest
from vaepatch.runs import verdict
from vaepatch.runs.prerun import free_port
from vaepatch.variant import Variant, split_list

__all__ = ["log_grid", "next_rate", "collect", "run_grid", "main"]

# In priority order (a grid that is stopped early has run the first ones' cells first).
VARIANTS = ("vanilla,qfloor-cst1,upbounded1-cst1,qfloor-floor,upbounded1-floor,upbounded1,explin-cst1,explin,"
            "softplus-ln2")
DEFAULTS = {"vdvae": dict(lrs="0.005:0.16:6", start=0.02, seeds="0,1,2", steps=1000, stall_steps=100, variants=VARIANTS,
                          skip="both"),
            "nvae": dict(lrs="0.0316,0.1,0.316,1,1.3,3.16,10", start=0.316, seeds="0,1,2", steps=1000, stall_steps=100,
                         variants="vanilla,qfloor-cst1,qfloor-floor,upbounded1-cst1,upbounded1-floor,upbounded1,"
                                  "softplus-ln2", skip="upstream"),
            # Efficient-VDVAE trains with Adamax at 1e-3 (its CIFAR-10 baseline); softplus-ln2 is its own sigma.
            # Its tiny vanilla still trains at 0.1 with its skip rule (2026-12-07), so the grid goes on to 1
            "effvdvae": dict(lrs="0.001:1:7", start=0.01, seeds="0,1,2", steps=1000, stall_steps=100,
                             variants=VARIANTS, skip="both")}
QUICK = dict(lrs="0.001:0.1:2", start=0.001, seeds="0", steps=4, stall_steps=3, variants="vanilla,upbounded1")


def log_grid(spec: str) -> list:
    """``"LO:HI:N"`` -> N log-spaced rates from LO to HI (3 significant digits); or a comma-separated list."""
    if ":" in spec:
        lo, hi, n = spec.split(":")
        lo, hi, n = float(lo), float(hi), int(n)
        if not (0 < lo < hi) or n < 2:
            raise ValueError(f"--lrs LO:HI:N needs 0 < LO < HI and N >= 2, got {spec!r}")
        return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)]
    lrs = sorted(float(v) for v in spec.split(",") if v.strip())
    if not lrs or lrs[0] <= 0:
        raise ValueError(f"--lrs takes positive rates, comma-separated, or LO:HI:N; got {spec!r}")
    return lrs


def next_rate(states: dict, lrs: list, start: float):
    """The next rate a (variant, policy) search runs, or None when its margin is settled.
    ``states[lr]``: True (passed), False (failed), None or absent (not run)."""
    known = {lr: ok for lr, ok in states.items() if ok is not None}
    if not known:
        return start
    failing = [lr for lr in lrs if known.get(lr) is False]
    if failing:
        i = lrs.index(failing[0])
        return lrs[i - 1] if i > 0 and lrs[i - 1] not in known else None
    i = lrs.index(max(known))
    return lrs[i + 1] if i + 1 < len(lrs) else None


def _finished(run_dir: Path, records: Path | None = None) -> bool:
    """Whether the run ended: its run.json says so, or (its folder gone) its verdict record is in ``records``."""
    gone = not (run_dir / run_manifest.FILENAME).exists()
    if records is not None and gone and _record_path(run_dir, records).exists():
        return True
    try:
        status = run_manifest.read(run_dir / run_manifest.FILENAME).get("status", "")
    except (run_manifest.LaunchError, AttributeError):
        return False
    return status.startswith(("completed", "stopped", "crashed"))


def _record_path(run_dir: Path, records: Path) -> Path:
    """A run's verdict record: ``records/skip-P/VARIANT/lrX/seedS.json``, mirroring the run's folder."""
    return records.joinpath(*run_dir.parts[-4:]).with_suffix(".json")


def judge(run_dir: Path, steps: int, records: Path | None = None) -> dict:
    """The run's verdict from its folder; a finished run's is also saved in ``records`` (run folders do not
    survive a move to another machine), and a run whose folder is gone is read from there."""
    if records is not None and not (run_dir / run_manifest.FILENAME).exists():
        path = _record_path(run_dir, records)
        if path.exists():
            return json.loads(path.read_text())
    result = verdict.judge_dir(run_dir, steps)
    if records is not None and _finished(run_dir):
        path = _record_path(run_dir, records)
        result = {**result, "run": str(Path(*run_dir.parts[-5:]))}  # runs/skip-P/VARIANT/lrX/seedS: from OUT
        run_manifest.write_atomic(path, json.dumps(result) + "\n")
    return result


def _run_dir(out: Path, policy: str, name: str, lr: float, seed: int) -> Path:
    return out / "runs" / f"skip-{policy}" / name.replace("/", "_") / f"lr{lr:g}" / f"seed{seed}"


def collect(out: Path, policies, names, lrs, seeds, steps: int, records: Path | None = None) -> dict:
    """``cells[policy][(variant, lr)]`` = one verdict per seed, from what is on disk (run folders, else
    the verdict records)."""
    return {p: {(n, lr): [{"seed": s, **judge(_run_dir(out, p, n, lr, s), steps, records)} for s in seeds]
                for n in names for lr in lrs} for p in policies}


def _one(job) -> int:
    command, log = job
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    run_dir = Path(log).parent
    if not _finished(run_dir):  # died before run.json said how it ended: say so, or the search would retry forever
        run_manifest.write(run_dir / run_manifest.FILENAME,
                           {"status": f"crashed: exit code {code} before the launcher recorded an end (see {log})"})
    return code


def _command(target, tiny, run_dir, data, policy, name, lr, seed, steps, stall_steps, extra, upstream,
             stop_at_nonfinite=False, skip_policies=None) -> list:
    options, train = tiny.run_args(run_dir, data, seed, lr, free_port())
    policies = tiny.SKIP_POLICIES if skip_policies is None else skip_policies
    return [sys.executable, "-m", "vaepatch", "run", target, "--variant", name, "--out", str(run_dir),
            "--cpu", "--max-steps", str(steps), *(["--stop-at-nonfinite"] if stop_at_nonfinite else []),
            "--stop-when-stalled", str(stall_steps), *options, *(["--upstream", str(upstream)] if upstream else []),
            "--", *train, *policies[policy], *extra]


class _Searches:
    """Which run to start next: the (policy, variant) searches in priority order, each stepping through
    the grid as its cells finish; a cell that has started runs all its seeds (its count is x/seeds)."""

    def __init__(self, out, policies, names, lrs, seeds, steps, start, every_cell, records=None):
        self.out, self.lrs, self.seeds, self.steps, self.every_cell = out, lrs, seeds, steps, every_cell
        self.records = records
        self.start = lrs[0] if start is None else min(lrs, key=lambda lr: abs(lr - start))
        self.searches = [(p, n) for n in names for p in policies]  # a variant under both policies, then the next
        self.known: dict = {}  # run dir -> verdict of a finished run (they do not change)

    def _verdict(self, run_dir: Path) -> dict:
        if run_dir in self.known:
            return self.known[run_dir]
        result = judge(run_dir, self.steps, self.records)
        if _finished(run_dir, self.records):
            self.known[run_dir] = result
        return result

    def _state(self, p, n, lr, busy) -> bool | None:
        runs = [self._verdict(d) if d not in busy else {"verdict": "not run", "passed": False}
                for d in (_run_dir(self.out, p, n, lr, s) for s in self.seeds)]
        return report.cell_state(runs)

    def _vanilla_margin(self, p, busy):
        """Vanilla's margin under policy ``p`` once its search has settled it, else None."""
        states = {("vanilla", lr): self._state(p, "vanilla", lr, busy) for lr in self.lrs}
        result = report.margins(states, self.lrs, ["vanilla"])["vanilla"]
        return result["margin"] if result["settled"] else None

    def next_run(self, busy: set):
        """``(policy, variant, lr, seed)`` of the next run to start, or None (nothing startable now).
        Each variant also runs at vanilla's margin (once vanilla's is settled): the end NELBO of the
        same rate, beside the one its own margin buys."""
        vanilla_margin = {}  # per policy, read from disk once per call
        for p, n in self.searches:
            started = [lr for lr in self.lrs if any(_finished(d, self.records) or d in busy for d in
                                                    (_run_dir(self.out, p, n, lr, s) for s in self.seeds))]
            if self.every_cell:
                cells = self.lrs
            else:
                rate = next_rate({lr: self._state(p, n, lr, busy) for lr in started}, self.lrs, self.start)
                cells = started + ([rate] if rate is not None and rate not in started else [])
                if n != "vanilla":
                    if p not in vanilla_margin:
                        vanilla_margin[p] = self._vanilla_margin(p, busy)
                    same = vanilla_margin[p]
                    cells += [same] if same is not None and same not in cells else []
            for lr in cells:
                for s in self.seeds:
                    d = _run_dir(self.out, p, n, lr, s)
                    if d not in busy and not _finished(d, self.records):
                        return p, n, lr, s
        return None


def run_grid(target: str, out: Path, policies, names, lrs, seeds, steps: int, stall_steps: int, *, start=None,
             jobs: int = 2, extra=(), upstream=None, every_cell: bool = False, launch=_one,
             stop_at_nonfinite: bool = False, records: Path | None = None) -> dict:
    """Run what is not finished yet, ``jobs`` runs at a time, the searches' runs in priority order (the
    variants as given, each under every policy: the first search's next run always goes first); returns
    :func:`collect`'s cells."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from tqdm import tqdm

    tiny = importlib.import_module(f"vaepatch.targets.{target}.tiny")  # make_data, run_args, SKIP_POLICIES
    data = tiny.make_data(out / "data", steps)
    searches = _Searches(out, policies, names, lrs, seeds, steps, start, every_cell, records)
    running: dict = {}  # future -> the run's folder
    codes = []
    bar = tqdm(desc=f"stability margin ({target}): runs", unit="run", file=sys.stderr)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        while True:
            while len(running) < max(1, jobs):
                job = searches.next_run(set(running.values()))
                if job is None:
                    break
                p, n, lr, s = job
                run_dir = _run_dir(out, p, n, lr, s)
                if run_dir.exists():  # an interrupted attempt: start that run over
                    shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
                command = _command(target, tiny, run_dir, data, p, n, lr, s, steps, stall_steps, extra, upstream,
                                   stop_at_nonfinite)
                running[pool.submit(launch, (command, run_dir / "stdout.txt"))] = run_dir
                bar.set_postfix_str(f"last started: skip {p}, {n}, lr {report.fmt_lr(lr)}, seed {s}")
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run_dir = running.pop(future)
                codes.append((future.result(), run_dir / "stdout.txt"))
                judge(run_dir, steps, records)  # its verdict record lands now, not when the grid ends
                bar.update(1)
            if len(codes) >= 2 * max(1, jobs) and all(code != 0 for code, _ in codes):
                tail = Path(codes[0][1]).read_text()[-2000:] if Path(codes[0][1]).exists() else ""
                raise SystemExit(f"vaepatch bench stability-margin: the first {len(codes)} runs all failed to run; "
                                 f"the first one's output ({codes[0][1]}):\n{tail}")
    bar.close()
    return collect(out, policies, names, lrs, seeds, steps, records)


def _parse(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="vaepatch bench stability-margin", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1] + f"\ndefaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--target", choices=sorted(DEFAULTS), default="vdvae")
    parser.add_argument("--out", help="folder for data, runs, JSON, Markdown and the heat map "
                                      "(default vaepatch-margin-TARGET)")
    parser.add_argument("--quick", action="store_true", help="smoke size (under 2 minutes); explicit flags still win")
    parser.add_argument("--lrs", help="LO:HI:N log-spaced, or a comma-separated list")
    parser.add_argument("--start", type=float, help="the rate each search starts at (the grid's nearest)")
    parser.add_argument("--every-cell", action="store_true",
                        help="run every cell of the grid, not only the deciding ones")
    parser.add_argument("--skip", choices=("upstream", "off", "both"),
                        help="the upstream's skip rule: its own (upstream), turned off, or both side by side "
                             "(VDVAE default both; NVAE has none: upstream)")
    parser.add_argument("--variants", help="comma-separated built-in names, ';' between inline specs with commas")
    parser.add_argument("--seeds", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, help="steps per run")
    parser.add_argument("--stall-steps", type=int,
                        help="a run whose last STALL_STEPS steps had no update is stalled (stopped, failed)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--upstream", help="the clone (default: $VAEPATCH_<TARGET>, then third_party/<target>)")
    parser.add_argument("--stop-at-nonfinite", action="store_true",
                        help="smoke runs only: stop each run at its first non-finite loss and fail it there "
                             "(the upstream itself skips such a step and trains on)")
    parser.add_argument("--records", help="folder of every finished run's verdict record (default OUT/records): a "
                                          "run whose folder is gone is read from there, not run again")
    parser.add_argument("--report-only", action="store_true", help="only read OUT/runs and write the tables")
    args = parser.parse_args(argv)
    fill_defaults(args, DEFAULTS[args.target], {**QUICK, "skip": DEFAULTS[args.target]["skip"]})
    return parser, args, extra


def main(argv=None) -> int:
    parser, args, extra = _parse(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out or f"vaepatch-margin-{args.target}").resolve()
    tiny = importlib.import_module(f"vaepatch.targets.{args.target}.tiny")
    policies = sorted(tiny.SKIP_POLICIES, key=lambda p: p != "off") if args.skip == "both" else [args.skip]
    if any(p not in tiny.SKIP_POLICIES for p in policies):
        parser.error(f"--skip {args.skip}: {args.target} has no skip rule to turn off (policies: "
                     f"{', '.join(tiny.SKIP_POLICIES)}); its runs already apply every finite update")
    try:
        lrs = log_grid(args.lrs)
        names = split_list(args.variants)
        for name in names:
            Variant.parse(name)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))
    if args.steps < 1 or args.stall_steps < 1 or not seeds or ("vanilla" not in names and not args.every_cell):
        parser.error("need --steps >= 1, --stall-steps >= 1, at least one seed, and vanilla among the variants "
                     "(the search measures every margin against vanilla's; --every-cell runs given cells without it)")
    if no_clone("stability-margin", args.target, args.upstream):
        return 2
    records = Path(args.records).resolve() if args.records else out / "records"
    started = time.perf_counter()
    if args.report_only:
        cells = collect(out, policies, names, lrs, seeds, args.steps, records)
    else:
        cells = run_grid(args.target, out, policies, names, lrs, seeds, args.steps, args.stall_steps, start=args.start,
                         jobs=args.jobs, extra=extra, upstream=args.upstream, every_cell=args.every_cell,
                         stop_at_nonfinite=args.stop_at_nonfinite, records=records)
    write(out, args, policies, names, lrs, seeds, extra, cells, time.perf_counter() - started)
    return 0


def write(out: Path, args, policies, names, lrs, seeds, extra, cells, seconds) -> None:
    """margin.json, margin.md and margin.png from the cells; the Markdown also to stdout."""
    summaries = {p: {key: report.cell_summary(runs) for key, runs in cells[p].items()} for p in policies}
    results = {p: report.margins({key: s["state"] for key, s in summaries[p].items()}, lrs, names) for p in policies}
    title = (f"{args.target} tiny config, CPU, {args.steps} steps, {len(seeds)} seeds: failed seeds per variant x "
             f"learning rate, and below it the end NELBO (median of the last 10% of steps) of the passing runs")
    lines = [f"# {title}", "", "Margins (largest rate that trains below the first that does not):", ""]
    lines += report.margin_lines(results, summaries, names)
    for p in policies:
        policy = f"Skip rule {p}: every cell" if len(policies) > 1 else "Every cell"
        lines += ["", f"## {policy} (pass = every seed ended trained; end NELBO of the passing runs, "
                      "mean ± std over seeds)", ""] + report.grid_lines(summaries[p], lrs, names)
    lines += ["", "## What broke at each variant's first failing rate", ""] + report.broke_lines(results, cells)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(target=args.target, skip=policies, lrs=lrs, variants=names, seeds=seeds, steps=args.steps,
                stall_steps=args.stall_steps, start=args.start, every_cell=args.every_cell, extra=extra,
                stop_at_nonfinite=getattr(args, "stop_at_nonfinite", False),
                report_only=getattr(args, "report_only", False),
                **report.provenance(cells, seconds),
                verdict=dict(end_fraction=verdict.END_FRACTION, spike_factor=verdict.SPIKE_FACTOR,
                             spike_window=verdict.SPIKE_WINDOW, mostly_skipped=verdict.MOSTLY_SKIPPED))
    record = {"meta": meta, "margins": results,
              "cells": [{"skip": p, "variant": n, "lr": lr, **summaries[p][(n, lr)], "runs": cells[p][(n, lr)]}
                        for p in policies for n in names for lr in lrs]}
    run_manifest.write_atomic(out / "margin.json", json.dumps(record, indent=1) + "\n")
    run_manifest.write_atomic(out / "margin.md", "\n".join(lines) + "\n")
    report.plot(summaries, lrs, names, out / "margin.png", title)
    print("\n".join(lines))
    print(f"\nwrote {out / 'margin.json'}, {out / 'margin.md'}, {out / 'margin.png'} ({seconds:.0f} s)")
