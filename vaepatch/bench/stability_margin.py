"""`vaepatch bench stability-margin`: at which learning rate does a run start to fail, per variant.

A log-spaced grid of learning rates x variants x seeds, each cell the real upstream (VDVAE by
default, ``--target nvae``) through ``vaepatch run TARGET --cpu`` on a tiny configuration for a fixed
number of steps (any configuration: upstream flags after ``--`` are appended and win). A run stops
early at its first non-finite loss (``--stop-at-nonfinite``) or once its last ``--dead`` steps had no
update (``--stop-when-stalled``), so failing cells cost little.

A cell passes when every seed ran all its steps with 0 non-finite losses, 0 skipped updates
(high-gradient or AMP) and no divergence: a finite loss above ``--diverge`` (10) times the first
step's. NVAE has no high-gradient skip, so without that rule a run whose loss climbs from 2e4 to 1e24
and stays finite would pass. A variant's margin is the largest learning rate of the grid below its first
failing one (every lower rate passes too); its ratio is that margin over vanilla's. Rerunning skips
finished runs, so a long grid survives interruption.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vaepatch.bench import fill_defaults
from vaepatch.runs.launch import free_port
from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest
from vaepatch.variant import Variant

__all__ = ["log_grid", "outcome", "margins", "collect", "run_grid", "table_lines", "plot", "main"]

VARIANTS = "vanilla,upbounded1,explin,upbounded1-cst1,explin-cst1,softplus-ln2,upbounded1-floor"
DEFAULTS = {"vdvae": dict(lrs="0.005:0.16:6", seeds="0,1,2", steps=300, dead=50, variants=VARIANTS),
            "nvae": dict(lrs="0.03162:1:4", seeds="0,1,2", steps=150, dead=30,
                         variants="vanilla,softplus-ln2,upbounded1,upbounded1-cst1,upbounded1-floor")}
DIVERGE = 10.0  # a finite loss above this many times the first step's is a failure
QUICK = dict(lrs="0.001:0.1:2", seeds="0", steps=4, dead=3, variants="vanilla,upbounded1")


def log_grid(spec: str) -> list:
    """``"LO:HI:N"`` -> N log-spaced rates from LO to HI; or a comma-separated list."""
    if ":" in spec:
        lo, hi, n = spec.split(":")
        lo, hi, n = float(lo), float(hi), int(n)
        if not (0 < lo < hi) or n < 2:
            raise ValueError(f"--lrs LO:HI:N needs 0 < LO < HI and N >= 2, got {spec!r}")
        return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.4g}") for i in range(n)]
    lrs = sorted(float(v) for v in spec.split(",") if v.strip())
    if not lrs or lrs[0] <= 0:
        raise ValueError(f"--lrs takes positive rates, comma-separated, or LO:HI:N; got {spec!r}")
    return lrs


def _finished(run_dir: Path) -> bool:
    try:
        status = run_manifest.read(run_dir / run_manifest.FILENAME).get("status", "")
    except (run_manifest.LaunchError, AttributeError):
        return False
    return status.startswith(("completed", "stopped", "crashed"))


def _diverged(log: list, factor: float):
    """(event, loss / first) of the first finite loss above ``factor`` x the first finite one, or None."""
    finite = [e for e in log if e["finite"] and e["loss"] is not None]
    if not finite or finite[0]["loss"] <= 0:
        return None  # a loss that starts at or below 0 has no scale to diverge from
    first = finite[0]["loss"]
    return next(((e, e["loss"] / first) for e in finite if e["loss"] > factor * first), None)


def _parts(event: dict) -> str:
    """``: kl K, recon R; posterior log sigma lo..hi, prior log sigma lo..hi`` from what the event holds."""
    parts = [f"{key} {event[key]:.3g}" for key in ("kl", "recon") if isinstance(event.get(key), (int, float))]
    ranges = [f"{side} log sigma {r[0]:.3g}..{r[1]:.3g}" for side in ("posterior", "prior")
              for r in [((event.get("scale") or {}).get(side) or {}).get("log_sigma")] if r and None not in r]
    text = "; ".join(x for x in (", ".join(parts), ", ".join(ranges)) if x)
    return f": {text}" if text else ""


def outcome(run_dir: Path, steps: int, diverge: float = DIVERGE) -> dict:
    """One run's result from its run.json and events: passed, counts, first failing step and what broke."""
    manifest = run_manifest.read(run_dir / run_manifest.FILENAME) or {}
    try:
        log = events.read(run_dir).events
    except FileNotFoundError:
        log = []
    counts = events.count(log)
    failing = [e["step"] for e in log if e["skipped"] or not e["finite"]]
    diverged = _diverged(log, diverge)
    first_failure = counts.first_failure
    if diverged:
        event, ratio = diverged
        if not failing or event["step"] < min(failing):
            first_failure = (f"step {event['step']}: loss diverged ({event['loss']:.3g}, {ratio:.3g}x the first step's)"
                             + _parts(event))
        failing.append(event["step"])
    ran_all = bool(log) and max(e["step"] for e in log) >= steps - 1
    skips = counts.grad_skips + counts.amp_skips
    return {"run": str(run_dir), "status": manifest.get("status", "missing"), "steps": counts.steps,
            "nan_steps": counts.nonfinite_loss_steps,
            "skips": skips, "diverged_step": diverged[0]["step"] if diverged else None,
            "first_fail_step": min(failing) if failing else None,
            "passed": ran_all and not failing and not manifest.get("status", "").startswith("crashed"),
            "first_failure": first_failure, "origins": counts.nonfinite_origins,
            "dead": counts.skip_streak, "final_loss": counts.last_loss}


def margins(cells: dict, lrs: list, names: list) -> dict:
    """Per variant: margin (largest grid rate below the first failing one), first failing rate, and
    whether some higher rate passed again. ``cells[(name, lr)]`` lists the seeds' outcomes."""
    out = {}
    for name in names:
        passed = [all(o["passed"] for o in cells.get((name, lr), [])) and bool(cells.get((name, lr))) for lr in lrs]
        first_fail = next((lr for lr, ok in zip(lrs, passed) if not ok), None)
        below = [lr for lr, ok in zip(lrs, passed) if ok and (first_fail is None or lr < first_fail)]
        out[name] = {"margin": below[-1] if below else None, "first_failing": first_fail,
                     "passes_above_failure": any(ok for lr, ok in zip(lrs, passed) if first_fail and lr > first_fail)}
    base = out.get("vanilla", {}).get("margin")
    for row in out.values():
        row["ratio"] = row["margin"] / base if base and row["margin"] else None
    return out


def _one(job) -> int:
    command, log = job
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as f:
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def _run_dirs(out: Path, names, lrs, seeds) -> dict:
    return {(n, lr, s): out / "runs" / n.replace("/", "_") / f"lr{lr:g}" / f"seed{s}"
            for n in names for lr in lrs for s in seeds}


def collect(out: Path, names, lrs, seeds, steps: int, diverge: float = DIVERGE) -> dict:
    """The outcomes by cell, ``cells[(variant, lr)]`` = one dict per seed, from what is on disk."""
    cells = {}
    for (name, lr, seed), run_dir in _run_dirs(out, names, lrs, seeds).items():
        cells.setdefault((name, lr), []).append({"seed": seed, **outcome(run_dir, steps, diverge)})
    return cells


def run_grid(target: str, out: Path, names, lrs, seeds, steps: int, dead: int, jobs: int = 2, extra=(),
             upstream=None, launch=_one, diverge: float = DIVERGE) -> dict:
    """Every (variant, lr, seed) run not finished yet, ``jobs`` at a time; returns the outcomes by cell."""
    from tqdm import tqdm

    tiny = importlib.import_module(f"vaepatch.targets.{target}.tiny")  # make_data, run_args
    data = tiny.make_data(out / "data", steps)
    where = _run_dirs(out, names, lrs, seeds)
    todo = []
    for (name, lr, seed), run_dir in where.items():
        if _finished(run_dir):
            continue
        if run_dir.exists():  # an interrupted attempt: start that run over
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        options, train = tiny.run_args(run_dir, data, seed, lr, free_port())
        command = [sys.executable, "-m", "vaepatch", "run", target, "--variant", name, "--out", str(run_dir),
                   "--cpu", "--max-steps", str(steps), "--stop-at-nonfinite", "--stop-when-stalled", str(dead),
                   *options, *(["--upstream", str(upstream)] if upstream else []), "--", *train, *extra]
        todo.append((command, run_dir / "stdout.txt"))
    print(f"{len(where) - len(todo)} of {len(where)} runs already finished; running {len(todo)}", file=sys.stderr)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(tqdm(pool.map(launch, todo), total=len(todo), desc=f"stability margin ({target})", file=sys.stderr))
    return collect(out, names, lrs, seeds, steps, diverge)


def _cell_text(runs: list) -> str:
    failed = sum(not r["passed"] for r in runs)
    nan, skips = sum(r["nan_steps"] for r in runs), sum(r["skips"] for r in runs)
    diverged = sum(r.get("diverged_step") is not None for r in runs)
    first = [r["first_fail_step"] for r in runs if r["first_fail_step"] is not None]
    text = f"{failed}/{len(runs)}"
    missing = sum(r["status"] == "missing" for r in runs)
    if missing:  # a grid read with --report-only before it finished
        return text + f" ({missing} not run yet)"
    if failed:
        text += f" ({nan} NaN, {skips} skips{f', {diverged} diverged' if diverged else ''}; first at {min(first) if first else '-'})"
    return text


def table_lines(cells: dict, result: dict, lrs: list, names: list) -> list:
    head = "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | margin | first failing | × vanilla |"
    lines = [head, "|" + "---|" * (len(lrs) + 4)]
    for name in names:
        r = result[name]
        margin = f"{r['margin']:g}" if r["margin"] else "none"
        ratio = f"{r['ratio']:.3g}" if r["ratio"] else "-"
        lines.append(f"| `{name}` | " + " | ".join(_cell_text(cells[(name, lr)]) for lr in lrs)
                     + f" | {margin} | {r['first_failing'] if r['first_failing'] else 'none'} | {ratio} |")
    return lines


def broke_lines(cells: dict, result: dict) -> list:
    """At each variant's first failing rate: what broke, per seed (from the events' provenance)."""
    lines = []
    for name, r in result.items():
        if r["first_failing"] is None:
            continue
        lines.append(f"- `{name}` at lr {r['first_failing']:g}:")
        for run in cells[(name, r["first_failing"])]:
            what = run["first_failure"] or ("no failing step; stopped early: " + run["status"])
            lines.append(f"  - seed {run['seed']}: {what}")
    return lines


def plot(cells: dict, lrs: list, names: list, path: Path, title: str) -> None:
    """Heat map in the style of the paper's Table 2: failed seeds / seeds per (variant, lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    frac = np.array([[sum(not o["passed"] for o in cells[(n, lr)]) / len(cells[(n, lr)]) for lr in lrs] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lrs), 0.9 + 0.45 * len(names)))
    ax.imshow(frac, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i, n in enumerate(names):
        for j, lr in enumerate(lrs):
            runs = cells[(n, lr)]
            ax.text(j, i, f"{sum(not o['passed'] for o in runs)}/{len(runs)}", ha="center", va="center", fontsize=9,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("learning rate")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    parser.add_argument("--variants", help="comma-separated built-in names, ';' between inline specs with commas")
    parser.add_argument("--seeds", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, help="steps per run")
    parser.add_argument("--dead", type=int, help="stop a run once this many steps in a row had no update")
    parser.add_argument("--diverge", type=float, default=DIVERGE,
                        help="a finite loss above this many times the first step's fails the run (default 10)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--upstream", help="the clone (default: $VAEPATCH_<TARGET>, then third_party/<target>)")
    parser.add_argument("--report-only", action="store_true", help="only read OUT/runs and write the tables")
    args = parser.parse_args(argv)
    fill_defaults(args, DEFAULTS[args.target], QUICK)
    out = Path(args.out or f"vaepatch-margin-{args.target}").resolve()
    try:
        lrs = log_grid(args.lrs)
        names = [v.strip() for v in args.variants.split(";" if ";" in args.variants else ",") if v.strip()]
        for name in names:
            Variant.parse(name)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))
    if args.steps < 1 or args.dead < 1 or not seeds or "vanilla" not in names or not args.diverge > 1:
        parser.error("need --steps >= 1, --dead >= 1, --diverge > 1, at least one seed, and vanilla among the variants")
    from vaepatch import upstream

    try:
        if upstream.locate(args.target, args.upstream) is None:
            print(f"vaepatch bench stability-margin: skipped: no {args.target} clone here "
                  f"(run `vaepatch fetch {args.target}`); this bench runs the real upstream", file=sys.stderr)
            return 2
    except upstream.UpstreamError as err:
        print(f"vaepatch bench stability-margin: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.report_only:
        cells = collect(out, names, lrs, seeds, args.steps, args.diverge)
    else:
        cells = run_grid(args.target, out, names, lrs, seeds, args.steps, args.dead, args.jobs, extra, args.upstream,
                         diverge=args.diverge)
    result = margins(cells, lrs, names)
    title = (f"{args.target} tiny, CPU: failed seeds / {len(seeds)} per variant x lr, {args.steps} steps "
             f"(fail = any non-finite loss, skipped update, or loss above {args.diverge:g}x the first step's)")
    lines = table_lines(cells, result, lrs, names)
    broke = broke_lines(cells, result)
    print("\n".join(["", title, ""] + lines + ["", "What broke at each variant's first failing rate:"] + broke))
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(target=args.target, lrs=lrs, variants=names, seeds=seeds, steps=args.steps, dead=args.dead,
                diverge=args.diverge,
                extra=extra, wall_seconds=time.perf_counter() - started)
    (out / "margin.json").write_text(json.dumps(
        {"meta": meta, "margins": result,
         "cells": [{"variant": n, "lr": lr, "runs": cells[(n, lr)]} for n in names for lr in lrs]}, indent=1) + "\n")
    (out / "margin.md").write_text("\n".join([f"# {title}", ""] + lines + ["", "What broke:"] + broke) + "\n")
    plot(cells, lrs, names, out / "margin.png", title)
    print(f"\nwrote {out / 'margin.json'}, {out / 'margin.md'}, {out / 'margin.png'} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0 if all(math.isfinite(lr) for lr in lrs) else 1
