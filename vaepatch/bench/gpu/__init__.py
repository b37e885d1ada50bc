"""`vaepatch bench gpu`: the GPU check, one command for what a CPU cannot measure (under 8 minutes on one
H100/H200); ``--dry-run`` runs the same code at tiny sizes, on a CPU in under 2 minutes.

Sections, in this order (cheap first, so that a slow one late in the run squeezes only the last),
each in an interpreter of its own (``vaepatch.bench.gpu.sections``):

  preflight        GPU, driver, torch, Triton, git, MPI; the clones verified
  launcher         mpiexec -n 1 vaepatch run vdvae (nccl, .cuda(), DDP device ids) and vaepatch run nvae,
                   30 steps each: run.json and one event per step checked
  ou-cost          OU (rho 0.9, K = 5) vs plain on the MLP hierarchy and the tiny VDVAE: step time, peak
                   memory and FLOP ratios beside the OU paper's x1.095 per epoch
  vdvae-step-time  real VDVAE, --hps cifar10 at full width, batch 16 as upstream: patched / vanilla step
                   time for upbounded1 and explin-cst1, eager and fuse=True (Triton), interleaved on the
                   same weights and batch, median of 20 steps after 5 warm-up; peak memory of each
  nvae-amp         vaepatch run nvae, a small CIFAR-10 model with NVAE's own fp16 autocast + GradScaler at
                   NVAE's learning rate without its warm-up, 300 steps per variant: "amp" and "nan"
                   events counted from events.jsonl, step-time ratio

OUT/gpu_check.json and OUT/gpu_check.md are rewritten after every section and while one runs, through
a temporary file, so a run cut short keeps what it measured; OUT/gpu_check_runs.tar.gz holds each run's
run.json, events.jsonl and the logs. A section that fails records its error and the check moves on.
--budget-s bounds the whole check: each section gets what is left (up to its own cap) and is stopped
there; one that no longer fits is skipped, and the report says so. Exit status 0 only if every section
is ok.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from vaepatch.bench.gpu import runs as gpu_runs
from vaepatch.bench.gpu.report import render_markdown
from vaepatch.bench.gpu.state import SCHEMA, Budget, dumps, read_json, write_atomic
from vaepatch.runs.manifest import now

__all__ = ["BEST_MARGIN_VARIANT", "DEFAULT_VARIANTS", "SECTIONS", "GPU", "DRY_RUN", "config", "main"]

# The stability-margin bench's winner on NVAE (`vaepatch bench stability-margin --target nvae`: x10
# vanilla's margin, tied with upbounded1 and upbounded1-cst1, with the smallest KL blow-up at its
# failing rate), appended to the NVAE AMP section's default variants: its prior floor keeps
# 1/sigma_p^2 <= 1e4, inside float16's range, which is what AMP tests.
BEST_MARGIN_VARIANT = "upbounded1-floor"
DEFAULT_VARIANTS = "vanilla;upbounded1-cst1"
SECTIONS = ("preflight", "launcher", "ou-cost", "vdvae-step-time", "nvae-amp")
REPORT, MARKDOWN, ARCHIVE = "gpu_check.json", "gpu_check.md", "gpu_check_runs.tar.gz"
POLL_S = 5.0  # how often a running section's partial results are merged into the report
GRACE_S = 15.0  # past its time, a section is stopped (SIGTERM to its process group, then SIGKILL)

# NVAE's own train.py arguments for the "small" model: a CIFAR-10 model of 2 latent scales x 5 groups of
# 10 latents, 32 channels, with the README command's SE, residual posterior and flow. ("tiny": the tests'
# smallest model, vaepatch.targets.nvae.tiny.TRAIN_ARGS, with one logistic per pixel.)
NVAE_SMALL = ["--num_channels_enc", "32", "--num_channels_dec", "32", "--num_latent_scales", "2",
              "--num_groups_per_scale", "5", "--num_latent_per_group", "10", "--num_preprocess_blocks", "1",
              "--num_preprocess_cells", "2", "--num_postprocess_blocks", "1", "--num_postprocess_cells", "2",
              "--num_cell_per_cond_enc", "2", "--num_cell_per_cond_dec", "2", "--use_se", "--res_dist",
              "--num_nf", "1", "--weight_decay_norm", "1e-2"]

# Each section: its sizes, its cap (the most it may take) and the least time worth starting it with.
GPU = {
    "preflight": dict(cap_s=90, min_s=10),
    "vdvae-step-time": dict(size="cifar10", configs=[["upbounded1", False], ["upbounded1", True],
                                                     ["explin-cst1", False], ["explin-cst1", True]],
                            steps=20, warmup=5, cap_s=210, min_s=60),
    # lr: NVAE's own 1e-2 without its 5-epoch warm-up (what keeps NVAE's early steps stable)
    "nvae-amp": dict(model_name="small", batch=32, lr=1e-2, steps=300, warmup=20, cap_s=150, min_s=45),
    "launcher": dict(steps=30, vdvae_variant="upbounded1", nvae_variant="upbounded1-cst1", vdvae_batch=16,
                     nvae_model="tiny", nvae_batch=16, cap_s=90, min_s=30),
    "ou-cost": dict(references=["mlp", "vdvae"], samples=5, steps=30, warmup=10, cap_s=45, min_s=15),
}
# --dry-run: GPU's sections at these sizes. Caps above what each takes on a loaded 2-core CPU (--budget-s bounds
# the sum); one fused config: torch.compile's C++ build takes ~20-30 s on this project's 2-core CPU.
DRY_RUN = {name: {**GPU[name], **small} for name, small in {
    "preflight": dict(cap_s=40, min_s=5),
    "vdvae-step-time": dict(size="tiny", configs=GPU["vdvae-step-time"]["configs"][:3], steps=2, warmup=1, cap_s=60,
                            min_s=10),
    "nvae-amp": dict(model_name="tiny", batch=8, steps=6, warmup=2, cap_s=40, min_s=10),
    "launcher": dict(steps=4, nvae_batch=8, cap_s=45, min_s=10),
    "ou-cost": dict(steps=3, warmup=1, cap_s=25, min_s=5)}.items()}
BUDGET_S = {False: 450.0, True: 115.0}  # default --budget-s, by --dry-run


def split_variants(text: str) -> list:
    """``a;b`` (or ``a,b`` when no spec has a comma) -> names, as the run scripts take --variants."""
    sep = ";" if ";" in text else ","
    return [v.strip() for v in text.split(sep) if v.strip()]


def config(args, device: str) -> dict:
    """Everything the sections read: sizes by --dry-run, with the command line's overrides."""
    from vaepatch.targets.nvae.tiny import TRAIN_ARGS as NVAE_TINY
    from vaepatch.targets.vdvae.tiny import TRAIN_ARGS as VDVAE_TINY

    # nvae_command gives --dataset and --batch_size itself
    tiny = [a for i, a in enumerate(NVAE_TINY) if not {a, NVAE_TINY[i - 1]} & {"--dataset", "--batch_size"}]
    models = {"tiny": [*tiny, "--num_mixture_dec", "1"], "small": NVAE_SMALL}
    sizes = {name: dict(spec) for name, spec in (DRY_RUN if args.dry_run else GPU).items()}
    variants = split_variants(args.variants) if args.variants else split_variants(DEFAULT_VARIANTS) + (
        [BEST_MARGIN_VARIANT] if BEST_MARGIN_VARIANT else [])
    amp = sizes["nvae-amp"]
    amp.update(variants=variants, model_args=models[amp["model_name"]])
    for key, value in (("lr", args.nvae_lr), ("steps", args.nvae_steps)):
        if value is not None:
            amp[key] = value
    if args.vdvae_steps is not None:
        sizes["vdvae-step-time"]["steps"] = args.vdvae_steps
    launch = sizes["launcher"]
    launch.update(vdvae_args=VDVAE_TINY, nvae_args=models[launch["nvae_model"]])
    return {"device": device, "dry_run": args.dry_run, "work": str(Path(args.work).resolve()), "python": sys.executable,
            "threads": args.threads if args.threads else (1 if device == "cpu" else None), "sections": sizes}


def _device(choice: str) -> str:
    import torch  # a dependency: config() imports it with the tiny models' arguments

    return choice if choice != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


class Check:
    """The running check: its report, written whole after every change."""

    def __init__(self, out: Path, work: Path, report: dict):
        self.out, self.work, self.report = out, work, report

    def save(self, budget: Budget | None = None) -> None:
        self.report["updated"] = now()
        if budget is not None:
            self.report["elapsed_s"] = round(budget.elapsed(), 1)
        write_atomic(self.out / REPORT, dumps(self.report))
        write_atomic(self.out / MARKDOWN, render_markdown(self.report))

    def section(self, name: str, **fields) -> None:
        self.report["sections"][name] = fields


def run_section(check: Check, name: str, seconds: float, config_path: Path, budget: Budget, env: dict,
                kill_after: float | None = None) -> dict:
    """One section in its own process group, told it has ``seconds``; its partial results merged into the
    report every POLL_S; stopped at ``kill_after`` (default ``seconds`` + GRACE_S). Returns its record."""
    kill_after = seconds + GRACE_S if kill_after is None else kill_after
    part = check.work / "parts" / f"{name}.json"
    part.unlink(missing_ok=True)
    log = check.work / "logs" / f"section-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "vaepatch.bench.gpu.sections", name, "--config", str(config_path),
               "--part", str(part), "--seconds", f"{seconds:.1f}"]
    t0 = time.monotonic()
    record = {"status": "running", "started": now(), "seconds": 0.0, "allotted_s": round(seconds, 1), "log": str(log)}
    with open(log, "ab") as sink:
        # its own process group (same session: whoever stops this command stops it too), so that stopping it
        # stops what it started (mpiexec, NVAE's data loader workers) as well
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, preexec_fn=os.setpgrp)
        code, stopped = None, False
        try:
            while code is None and not stopped:
                try:
                    code = proc.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    stopped = time.monotonic() - t0 > kill_after
                    partial = read_json(part) or {}
                    record.update(seconds=round(time.monotonic() - t0, 1), result=partial.get("result"))
                    check.section(name, **record)
                    check.save(budget)
        finally:  # past its time, or stopped ourselves (SIGTERM, Ctrl-C): take the section down with us
            if code is None:
                gpu_runs.stop(proc)
    partial = read_json(part) or {}
    record.update(seconds=round(time.monotonic() - t0, 1), result=partial.get("result"),
                  status=partial.get("status") or "error", error=partial.get("error"))
    if stopped:
        record.update(status="timeout", error=f"stopped after {kill_after:.0f} s (its share of --budget-s); "
                                              "what it had measured is kept")
    elif code != 0 and record["status"] in ("running", "ok", "error") and not record["error"]:
        record.update(status="error", error=f"exit code {code}: " + log.read_text(errors="replace")[-1500:])
    return record


def archive(work: Path, dest: Path, max_log_bytes: int = 200_000) -> None:
    """Each run's run.json and events.jsonl, the section parts and the (tail of each) log, in one tarball."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(work.rglob("*")):
            rel = path.relative_to(work)
            if not path.is_file() or not (path.name in ("run.json", "events.jsonl", "log.txt", "log.jsonl")
                                          or rel.parts[0] == "parts" or path.suffix == ".log"):
                continue
            if path.suffix == ".log" and path.stat().st_size > max_log_bytes:
                data = path.read_bytes()[-max_log_bytes:]
                info = tarfile.TarInfo(str(rel))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(path, arcname=str(rel))
    write_atomic(dest, buffer.getvalue())


def _one_section(check: Check, name: str, spec: dict, config_path: Path, budget: Budget, env: dict) -> None:
    """Run (or skip, when it no longer fits the budget) one section; the report and the tarball after it."""
    seconds, why = budget.allot(spec["cap_s"], spec["min_s"])
    if seconds is None:
        check.section(name, status="skipped", note=why)
    else:
        check.section(name, **run_section(check, name, seconds, config_path, budget, env))
    record = check.report["sections"][name]
    try:
        archive(check.work, check.out / ARCHIVE)
    except OSError as err:
        record["archive_error"] = str(err)
    check.save(budget)
    note = (record.get("error") or record.get("note") or "").splitlines()
    print(f"== {name}: {record['status']} ({record.get('seconds') or 0:.0f} s) {note[0][:200] if note else ''}",
          flush=True)


def _parser():
    p = argparse.ArgumentParser(prog="vaepatch bench gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="vaepatch-gpu-check", help="where gpu_check.json, .md and the runs' tarball go")
    p.add_argument("--work", help="runs, data and logs (default OUT/work; on the GPU machine keep it out of $OUT)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, a few steps, same code (a CPU, < 2 minutes)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when torch sees one")
    p.add_argument("--budget-s", type=float, help=f"wall-clock budget (default {BUDGET_S[False]:.0f}; --dry-run "
                                                  f"{BUDGET_S[True]:.0f})")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, in order (default: {','.join(SECTIONS)})")
    p.add_argument("--variants", help=f"NVAE AMP variants, ';'-separated (default {DEFAULT_VARIANTS!r}"
                                      " + BEST_MARGIN_VARIANT when set)")
    p.add_argument("--nvae-lr", type=float,
                   help="NVAE AMP learning rate (default 1e-2, NVAE's own, without its warm-up)")
    p.add_argument("--nvae-steps", type=int, help="NVAE AMP steps per variant (default 300; --dry-run 6)")
    p.add_argument("--vdvae-steps", type=int, help="VDVAE timed steps per config (default 20; --dry-run 2)")
    p.add_argument("--threads", type=int, help="torch threads in each section (default: 1 on CPU, torch's on CUDA)")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    out = Path(args.out)
    args.work = args.work or str(out / "work")
    work = Path(args.work)
    budget = Budget(args.budget_s if args.budget_s is not None else BUDGET_S[args.dry_run])
    device = _device(args.device)
    cfg = config(args, device)
    config_path = work / "config.json"
    write_atomic(config_path, dumps(cfg))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(cfg["threads"] or 1))
    report = {"schema": SCHEMA, "dry_run": args.dry_run, "device": device,
              "command": sys.argv[:1] + list(argv or sys.argv[1:]),
              "started": now(), "budget_s": budget.total_s, "finished": False, "work": str(work.resolve()),
              "config": cfg["sections"], "sections": {name: {"status": "pending"} for name in sections}}
    check = Check(out, work, report)
    check.save(budget)
    print(f"vaepatch bench gpu: {'dry run, ' if args.dry_run else ''}device {device}, budget {budget.total_s:.0f} s, "
          f"report {out / REPORT}, runs and logs in {work}", flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds run_section: it stops its section
    try:
        for name in sections:
            _one_section(check, name, cfg["sections"][name], config_path, budget, env)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["finished"] = True
    check.save(budget)
    print(render_markdown(report))
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
