"""`vaepatch bench skip-counts`: the paper's Table 4 at CPU scale. Over a long run at the rate people
train at, how many steps does each variant NaN on, how many updates does VDVAE's skip rule throw
away, does any run stall, and where does it end?

The real openai/vdvae (tiny configuration, ``vaepatch run vdvae --cpu``; ``--target effvdvae``: Efficient-VDVAE,
whose rule skips at a gradient norm of 800), every variant at one learning rate (``--lr``, default 0.01 for VDVAE:
the rate every variant trains at on the tiny model; 0.001 for Efficient-VDVAE: its own), seeds 0-2, ``--steps``
steps (default 5,000), under two skip policies:

- ``bind``: a gradient-norm threshold placed where it binds at this scale. VDVAE's own 400 never
  binds on the tiny model (its gradient norm's 99th percentile is ~20-30), so the threshold is
  calibrated once, from vanilla's own run with the rule off (seed 0, the ``off`` grid's first run):
  the gradient norm that run exceeds on ``--quantile`` (default 0.1%) of its steps in the second half
  of training (the norm drifts up as training goes on: the first half's would bind more and more
  often later). The same threshold for every variant; ``--threshold`` sets it by hand.
- ``off``: ``--skip_threshold -1``; a NaN step is still not applied (upstream never applies one).

Every run is judged as upstream trains it (``vaepatch.runs.verdict``). Each finished run leaves a
small verdict record in ``--records`` (default OUT/records) with its counts, the steps of its skips
and NaN steps, and a sampled loss curve: the table and the figure are drawn from those records
alone, so a grid resumes from them on another machine (runs already recorded are not run again).
Runs start in priority order: the ``bind`` policy first, seeds round-robin, the first five variants
of the list first, so a partial grid is balanced.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from vaepatch.bench import fill_defaults, no_clone
from vaepatch.bench import margin
from vaepatch.bench.skip_counts import report
from vaepatch.runs import events as _events
from vaepatch.runs import manifest as run_manifest
from vaepatch.runs import verdict
from vaepatch.variant import Variant, split_list

__all__ = ["calibrate", "record_run", "load_records", "order", "main"]

PRIORITY = ("vanilla", "upbounded1", "upbounded1-cst1", "explin-cst1", "qfloor-cst1")
LRS = {"vdvae": 0.01, "effvdvae": 0.001}  # --lr's default per --target
DEFAULTS = dict(steps=5000, seeds="0,1,2", skip="bind,off", quantile=0.001, stall_steps=100,
                variants=",".join(PRIORITY + ("explin", "vanilla-cst1", "upbounded1-floor")))
QUICK = dict(steps=30, seeds="0", variants="vanilla,upbounded1", stall_steps=20)
CALIBRATION = ("off", "vanilla", 0)  # the run the threshold is read from: (policy, variant, seed)
CURVE_POINTS = 100  # the sampled loss curve each record keeps


def calibrate(log: list, quantile: float) -> dict:
    """The threshold the second half of a run's applied steps exceed on ``quantile`` of them, rounded up
    to two significant digits; with what it was read from."""
    steps = sorted({e["step"] for e in log})
    half = steps[len(steps) // 2] if steps else 0
    norms = sorted(e["grad_norm"] for e in log if e["step"] >= half and not e["skipped"] and e["grad_norm"] is not None)
    if not norms:
        raise ValueError("the calibration run has no applied step with a gradient norm in its second half")
    value = norms[min(len(norms) - 1, math.ceil((1 - quantile) * len(norms)) - 1)]
    digits = 1 - math.floor(math.log10(value))
    threshold = math.ceil(value * 10 ** digits) / 10 ** digits
    above = sum(n > threshold for n in norms)
    return {"threshold": threshold, "quantile": quantile, "from_steps": [half, steps[-1]], "applied_steps": len(norms),
            "exceeded_by": above, "median_grad_norm": statistics.median(norms), "max_grad_norm": norms[-1]}


def _sampled_curve(log: list, points: int = CURVE_POINTS) -> list:
    """``[step, median NELBO]`` over ``points`` equal windows of the run (None where a window has no finite step)."""
    curve = verdict.curve(log, verdict.nelbo)
    if not curve:
        return []
    size = max(1, math.ceil(len(curve) / points))
    out = []
    for i in range(0, len(curve), size):
        window = [loss for _, loss, _ in curve[i:i + size] if loss is not None]
        out.append([curve[min(i + size, len(curve)) - 1][0], statistics.median(window) if window else None])
    return out


def record_run(run_dir: Path, steps: int, **key) -> dict:
    """A finished run's verdict record: the verdict with its counts, the steps where an update was skipped
    by the threshold or a NaN, and the sampled loss curve (what the table and figure need)."""
    judged = verdict.judge_dir(run_dir, steps)
    log = _events.read(run_dir).events if (run_dir / _events.FILENAME).exists() else []
    reasons: dict = {}
    for e in log:
        reasons.setdefault(e["step"], set()).add(e["reason"])
    nan = sorted(s for s, r in reasons.items() if "nan" in r)
    grad = sorted(s for s, r in reasons.items() if "grad" in r and "nan" not in r)
    return {**key, "steps_asked": steps, **judged, "run": str(run_dir), "grad_skip_steps": grad, "nan_step_list": nan,
            "curve": _sampled_curve(log)}


def _record_path(records: Path, policy: str, name: str, seed: int) -> Path:
    return records / f"skip-{policy}" / f"{name.replace('/', '_')}-seed{seed}.json"


def load_records(records: Path) -> dict:
    """``{(policy, variant, seed): record}`` from every record file under ``records``."""
    found = {}
    for path in sorted(records.glob("skip-*/*.json")):
        record = json.loads(path.read_text())
        found[(record["policy"], record["variant"], record["seed"])] = record
    return found


def order(policies: list, names: list, seeds: list) -> list:
    """Run order: policy by policy, seeds round-robin, the priority variants first."""
    first = [n for n in names if n in PRIORITY]
    rest = [n for n in names if n not in PRIORITY]
    return [(p, n, s) for p in policies for group in (first, rest) for s in seeds for n in group]


def _matches(record: dict, args, threshold) -> bool:
    return (record.get("steps_asked") == args.steps and record.get("lr") == args.lr
            and (record["policy"] != "bind" or record.get("threshold") == threshold))


def _saved_threshold(args) -> dict | None:
    """The binding threshold if known: ``--threshold``, or the calibration saved beside the records."""
    if "bind" not in args.policies:
        return None
    if args.threshold is not None:
        return {"threshold": args.threshold, "rule": "set by hand (--threshold)"}
    saved = args.records / "threshold.json"
    return json.loads(saved.read_text()) if saved.exists() else None


def _calibrate(args, out: Path, job) -> dict | None:
    """Once the calibration run has finished (``job`` is the run that just did): its threshold, saved
    beside the records; None for any other run, or when the bind policy is not asked for."""
    if job != CALIBRATION or "bind" not in args.policies:
        return None
    policy, name, seed = CALIBRATION
    run_dir = margin._run_dir(out, policy, name, args.lr, seed)
    calibration = {**calibrate(_events.read(run_dir).events, args.quantile),
                   "rule": f"exceeded on {args.quantile * 100:g}% of the applied steps in the second half of vanilla's "
                           f"run with the rule off (seed {seed}, lr {args.lr:g}, {args.steps} steps)",
                   "run": os.path.relpath(run_dir, out)}
    run_manifest.write_atomic(args.records / "threshold.json", json.dumps(calibration, indent=1) + "\n")
    return calibration


def run(args, out: Path, launch=margin._one) -> tuple[dict, dict | None]:
    """Run what no record holds yet, ``args.jobs`` at a time (``launch((command, log))`` runs one); returns
    (records, calibration)."""
    from tqdm import tqdm

    tiny = importlib.import_module(f"vaepatch.targets.{args.target}.tiny")  # make_data, run_args, the rules

    data = tiny.make_data(out / "data", args.steps)
    args.records.mkdir(parents=True, exist_ok=True)
    records = load_records(args.records)

    def command(policy, name, seed, threshold):
        policies = {policy: tiny.SKIP_POLICIES["off"] if policy == "off" else tiny.threshold_args(threshold)}
        run_dir = margin._run_dir(out, policy, name, args.lr, seed)
        return run_dir, margin._command(args.target, tiny, run_dir, data, policy, name, args.lr, seed, args.steps,
                                        args.stall_steps, args.extra, args.upstream, skip_policies=policies)

    def finish(policy, name, seed, threshold, run_dir):
        key = dict(policy=policy, variant=name, seed=seed, lr=args.lr,
                   threshold=threshold if policy == "bind" else None)
        record = {**record_run(run_dir, args.steps, **key), "run": os.path.relpath(run_dir, out)}
        run_manifest.write_atomic(_record_path(args.records, policy, name, seed), json.dumps(record) + "\n")
        records[(policy, name, seed)] = record

    def start(pool, policy, name, seed, threshold):
        run_dir, cmd = command(policy, name, seed, threshold)
        if run_dir.exists():  # an interrupted attempt: start that run over
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        return pool.submit(launch, (cmd, run_dir / "stdout.txt")), run_dir

    calibration = _saved_threshold(args)
    jobs = [job for job in order(args.policies, args.names, args.seeds)
            if not (job in records and _matches(records[job], args, calibration and calibration["threshold"]))]
    if calibration is None and "bind" in args.policies:  # read from vanilla's rule-off run: that one first
        jobs.sort(key=lambda job: job != CALIBRATION)
    bar = tqdm(total=len(jobs), desc=f"skip counts ({args.target}): runs", unit="run", file=sys.stderr)
    running: dict = {}

    def startable(job) -> bool:  # a bind run waits for the threshold; while it is unknown, rule-off runs go
        return job[0] != "bind" or calibration is not None

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        while jobs or running:
            while len(running) < max(1, args.jobs) and any(startable(job) for job in jobs):
                policy, name, seed = job = next(job for job in jobs if startable(job))
                jobs.remove(job)
                threshold = calibration["threshold"] if policy == "bind" else None
                run_dir = margin._run_dir(out, policy, name, args.lr, seed)
                if not margin._finished(run_dir):  # else: on disk from an earlier call, not yet recorded
                    future, run_dir = start(pool, policy, name, seed, threshold)
                    running[future] = (policy, name, seed, threshold, run_dir)
                    bar.set_postfix_str(f"last started: skip {policy}, {name}, seed {seed}")
                    continue
                finish(policy, name, seed, threshold, run_dir)
                calibration = calibration or _calibrate(args, out, job)
                bar.update(1)
            if not running:
                if jobs:  # only bind runs are left and nothing can calibrate them
                    raise SystemExit("vaepatch bench skip-counts: no binding threshold (the calibration run did "
                                     "not finish); give --threshold")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                policy, name, seed, threshold, run_dir = running.pop(future)
                finish(policy, name, seed, threshold, run_dir)
                calibration = calibration or _calibrate(args, out, (policy, name, seed))
                bar.update(1)
    bar.close()
    return records, calibration


def _parse(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="vaepatch bench skip-counts", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1] + f"\ndefaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--target", choices=sorted(LRS), default="vdvae", help="the upstream (default vdvae)")
    parser.add_argument("--out", help="folder for data, runs, table and figure (default vaepatch-skip-counts, "
                                      "-TARGET for another target)")
    parser.add_argument("--records", help="folder of the verdict records (default OUT/records): runs recorded "
                                          "there are not run again")
    parser.add_argument("--quick", action="store_true", help="smoke size (a few minutes); explicit flags still win")
    parser.add_argument("--variants", help="comma-separated built-in names, ';' between inline specs with commas")
    parser.add_argument("--seeds", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, help="steps per run")
    parser.add_argument("--lr", type=float, help="the learning rate of every run")
    parser.add_argument("--skip", help="skip policies, comma-separated: bind (a calibrated threshold), off")
    parser.add_argument("--threshold", type=float, help="the binding threshold, instead of calibrating it")
    parser.add_argument("--quantile", type=float, help="share of the calibration run's steps above the threshold")
    parser.add_argument("--stall-steps", type=int, help="a run with this many steps in a row without an update is "
                                                        "stalled (stopped, failed)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--upstream", help="the clone (default: $VAEPATCH_<TARGET>, then third_party/<target>)")
    parser.add_argument("--report-only", action="store_true", help="only read the records and write table and figure")
    args = parser.parse_args(argv)
    fill_defaults(args, {**DEFAULTS, "lr": LRS[args.target]}, QUICK)
    args.extra = extra
    try:
        args.names = split_list(args.variants)
        for name in args.names:
            Variant.parse(name)
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))
    args.policies = [p.strip() for p in args.skip.split(",") if p.strip()]
    bad = [p for p in args.policies if p not in ("bind", "off")]
    if bad or not args.policies:
        parser.error(f"--skip takes bind and/or off, comma-separated; got {args.skip!r}")
    if args.steps < 2 or args.stall_steps < 1 or not args.seeds or not 0 < args.quantile < 1 or args.lr <= 0:
        parser.error("need --steps >= 2, --stall-steps >= 1, a seed, 0 < --quantile < 1 and --lr > 0")
    default_out = "vaepatch-skip-counts" + ("" if args.target == "vdvae" else f"-{args.target}")
    args.out = Path(args.out or default_out).resolve()
    args.records = Path(args.records).resolve() if args.records else args.out / "records"
    calibrated = (args.records / "threshold.json").exists()  # a resumed grid may run its bind runs alone
    if ("bind" in args.policies and args.threshold is None and not calibrated
            and ("off" not in args.policies or "vanilla" not in args.names or 0 not in args.seeds)):
        parser.error("calibrating the bind threshold needs vanilla's seed-0 run with the rule off: keep vanilla, "
                     "seed 0 and --skip off in the grid, give --threshold, or point --records at a folder whose "
                     "threshold.json holds an earlier calibration")
    return args


def main(argv=None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    out = args.out
    started = time.perf_counter()
    if args.report_only:
        records = load_records(args.records)
        saved = args.records / "threshold.json"
        calibration = json.loads(saved.read_text()) if saved.exists() else None
    else:
        if no_clone("skip-counts", args.target, args.upstream):
            return 2
        records, calibration = run(args, out)
    report.write(out, args, records, calibration, time.perf_counter() - started)
    return 0
