"""`vaepatch bench vdvae-stress`: the real openai/vdvae on CPU at a learning rate that breaks it.

A tiny configuration (width 32, zdim 8, one block per resolution, batch 16, ``--hps cifar10``
otherwise) at lr 0.1 takes vanilla VDVAE to NaN within a few hundred steps. Every variant x
seed runs through ``vaepatch run vdvae --cpu`` as its own process (two at a time, one thread
each), on a CIFAR-format dataset cut from scikit-learn's photos, and the table is counted
from each run's per-step events. Needs a clone (``vaepatch fetch vdvae``) and mpi4py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vaepatch import cifar_format, compare
from vaepatch.runs.prerun import free_port
from vaepatch.targets.vdvae.tiny import TRAIN_ARGS as TINY_ARGS
from vaepatch.variant import split_list, variants

PAPER_TABLE_4 = {  # Dehaene & Brossard, Table 4: VDVAE on CIFAR-10, NaN steps / high-gradient skips
    "vanilla": ("13 ± 3", "22 ± 9"), "upbounded1": ("0", "0"), "explin": ("0", "47 ± 61"),
    "explin-cst1": ("0", "1 ± 1"),
}


def train_args(data: Path, run_dir: Path, name: str, seed: int, lr: float, port: int) -> list[str]:
    return [*TINY_ARGS, "--lr", str(lr), "--seed", str(seed), "--data_root", str(data),
            "--save_dir", str(run_dir / "vdvae"), "--desc", name, "--port", str(port),
            "--iters_per_images", "1000000"]


def _one(job) -> tuple[str, int, float]:
    run_dir, command, log = job
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as f:
        rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return str(run_dir), rc, time.perf_counter() - start


def run_grid(out: Path, variant_names, seeds, steps: int, lr: float, jobs: int = 2, upstream=None) -> list[Path]:
    from tqdm import tqdm

    data = out / "data"
    batch = int(TINY_ARGS[TINY_ARGS.index("--n_batch") + 1])
    if not (data / "cifar-10-batches-py" / "test_batch").exists():
        cifar_format.make(data, n_train=cifar_format.VALIDATION_HOLDOUT + batch * steps + batch, n_test=100)
    todo, run_dirs = [], []
    for i, (variant, seed) in enumerate((v, s) for v in variant_names for s in seeds):
        name = f"{variant}-seed{seed}"
        run_dir = out / "runs" / name
        run_dirs.append(run_dir)
        command = [sys.executable, "-m", "vaepatch", "run", "vdvae", "--variant", variant, "--out", str(run_dir),
                   "--cpu", "--max-steps", str(steps)]
        if upstream:
            command += ["--upstream", str(upstream)]
        command += ["--", *train_args(data, run_dir, name, seed, lr, port=free_port())]
        run_dir.mkdir(parents=True, exist_ok=True)
        todo.append((run_dir, command, run_dir / "stdout.txt"))
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        for run_dir, rc, seconds in tqdm(pool.map(_one, todo), total=len(todo), desc="vdvae stress runs"):
            if rc != 0:
                failed.append(f"{run_dir} exited {rc}; see {run_dir}/stdout.txt")
    for message in failed:
        print("warning:", message, file=sys.stderr)
    return run_dirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench vdvae-stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="vdvae-stress", help="folder for data, runs, table and figure")
    parser.add_argument("--variants", default=",".join(variants()), help="comma-separated (default: all built-in)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one CPU thread each)")
    parser.add_argument("--upstream", help="VDVAE clone (default: $VAEPATCH_VDVAE, then third_party/vdvae)")
    parser.add_argument("--report-only", action="store_true", help="only re-read OUT/runs and print the table")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    names = split_list(args.variants)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    if args.report_only:
        run_dirs = compare.find_runs([out / "runs"])
    else:
        run_dirs = run_grid(out, names, seeds, args.steps, args.lr, args.jobs, args.upstream)
    runs = [compare.load_run(p) for p in run_dirs]
    summary = compare.summarize(runs)
    text = compare.render(summary, "md")
    print(f"\nopenai/vdvae, tiny config on CPU, lr {args.lr}, {args.steps} steps, seeds {args.seeds}:\n")
    print(text)
    for problem in (p for s in summary for p in s["problems"]):
        print(f"problem: {problem}", file=sys.stderr)
    (out / "stress.md").write_text(text + "\n")
    (out / "stress.json").write_text(json.dumps(
        [{"run": str(r.path), "variant": r.variant, "seed": r.seed, "status": r.status,
          "end_loss": r.end_loss, "problems": r.problems, **vars(r.counts)} for r in runs], indent=2) + "\n")
    compare.plot(runs, out / "stress.png")
    print(f"\ntable: {out / 'stress.md'}, per run: {out / 'stress.json'}, figure: {out / 'stress.png'} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0
