"""The GPU check's sections (what each measures: ``vaepatch.bench.gpu``). ``vaepatch bench gpu`` runs each
in an interpreter of its own (``python -m vaepatch.bench.gpu.sections NAME --config CONFIG.json --part
PART.json --seconds S``): a crash, a hung kernel or the time budget then ends one section, never the
check, and VDVAE's and NVAE's clashing module names never meet. A section writes its result to
PART.json after every row it finishes (atomically), so one stopped at its time keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

from vaepatch.bench.gpu import runs as gpu_runs
from vaepatch.bench.gpu.state import dumps, read_json, section_status, write_atomic

__all__ = ["SECTIONS", "Context", "main"]

MARGIN_S = 3.0  # kept back inside a section's time for writing its last result


class Context:
    """One section's run: its config, work folder, deadline, and the part file its results go to."""

    def __init__(self, config: dict, part: Path, seconds: float):
        self.config, self.part = config, Path(part)
        self.work = Path(config["work"])
        self.device = config["device"]
        self.cpu = self.device == "cpu"
        self.python = config.get("python") or sys.executable
        self.deadline = time.monotonic() + seconds - MARGIN_S
        self.result: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def emit(self, result: dict, status: str = "running", error: str | None = None) -> None:
        self.result = result
        write_atomic(self.part, dumps({"status": status, "error": error, "result": result}))

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _run_text(command: list, timeout: float = 60) -> str:
    """A short command's first output line, or what went wrong."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"failed: {_error(err)}"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if done.returncode == 0 and text else f"failed (exit {done.returncode}): {text[-300:]}"


# -- preflight ---------------------------------------------------------------------------------------
def preflight(cfg: dict, ctx: Context) -> dict:
    import importlib.metadata as md
    import platform

    import torch

    from vaepatch import upstream

    r = {"device": ctx.device, "python": sys.version.split()[0], "executable": sys.executable,
         "platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    versions = {}
    for name in ("triton", "numpy", "torchvision", "mpi4py", "mpich", "GitPython", "scikit-learn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    r["versions"] = versions
    problems = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        r.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                 gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    elif ctx.device == "cuda":
        problems.append("no CUDA device visible, but --device cuda")
    if shutil.which("nvidia-smi"):
        r["nvidia_smi"] = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                     "clocks.max.sm,power.limit,temperature.gpu,utilization.gpu",
                                     "--format=csv,noheader"], 30)
    r["git"] = _run_text(["git", "--version"], 20) if shutil.which("git") else None
    if not r["git"]:
        problems.append("no git on PATH: the clones cannot be verified (vaepatch.apply and vaepatch run refuse)")
    r["mpiexec"] = shutil.which("mpiexec")
    probe = [ctx.python, "-c", "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"]
    r["mpi"] = _run_text(([r["mpiexec"], "-n", "1"] if r["mpiexec"] else []) + probe, 60)
    if not r["mpiexec"] or r["mpi"].startswith("failed"):
        problems.append(f"MPI: mpiexec {r['mpiexec']}, {r['mpi']}")
    try:
        r["hostname"] = f"{socket.gethostname()} -> {socket.gethostbyname(socket.gethostname())}"
    except OSError as err:
        r["hostname"] = f"{socket.gethostname()} does not resolve ({err}): VDVAE's MASTER_ADDR is the hostname"
        problems.append(r["hostname"])
    clones = {}
    for name in ("vdvae", "nvae"):
        try:
            path = upstream.locate(name)
            clones[name] = "missing" if path is None else f"{upstream.verify(path, name)} at the pinned commit, clean"
        except upstream.UpstreamError as err:
            clones[name] = f"unusable: {err}".splitlines()[0]
        if not clones[name].endswith("clean"):
            problems.append(f"{name} clone {clones[name]}")
    r["clones"], r["problems"] = clones, problems
    r["ok"] = not problems
    return r


# -- VDVAE: patched / vanilla step time --------------------------------------------------------------
def vdvae_step_time(cfg: dict, ctx: Context) -> dict:
    from vaepatch.targets.vdvae import steptime

    result = {"device": ctx.device, "size": cfg["size"], "steps": cfg["steps"], "warmup": cfg["warmup"], "rows": []}
    took = {}  # seconds of the last eager / fused config: a fused one also compiles
    for variant, fuse in cfg["configs"]:
        need = 1.2 * took.get(fuse, max(took.values(), default=0.0))
        if ctx.left() < need:
            result["rows"].append({"variant": variant, "fuse": fuse, "error": f"skipped: {ctx.left():.0f} s left, "
                                   f"the last {'fused' if fuse else 'eager'} config took {need / 1.2:.0f} s"})
            continue
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                row = steptime.measure(variant, cfg["steps"], cfg["warmup"], fuse=fuse, device=ctx.device,
                                       size=cfg["size"], memory=True)
            except Exception as err:  # noqa: BLE001 - one config failing must not lose the others
                row = {"variant": variant, "fuse": fuse, "error": _error(err),
                       "traceback": traceback.format_exc()[-2000:]}
        # e.g. "torch.compile of the fused block math failed ...": then the fused row timed the eager math
        row["warnings"] = sorted({str(w.message).splitlines()[0][:300] for w in caught if "vaepatch" in str(w.message)})
        took[fuse] = row["seconds"] = time.monotonic() - t0
        result["batch"] = row.get("batch", result.get("batch"))
        result["rows"].append(row)
        result["fuse_summary"] = fuse_summary(result["rows"])
        ctx.emit(result)
    result["ok"] = all(not r.get("error") for r in result["rows"])
    return result


def fuse_summary(rows) -> dict:
    """Per variant with both rows: the eager and the fused patched / vanilla ratio, and fused patched time
    over eager patched time (each row timed its own vanilla, so compare the ratios first)."""
    by = {(r["variant"], r["fuse"]): r for r in rows if not r.get("error")}
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        eager, fused = by.get((variant, False)), by.get((variant, True))
        if eager and fused:
            summary[variant] = {"eager_ratio": eager["ratio"], "fused_ratio": fused["ratio"],
                                "fused_over_eager_patched": fused["patched_s"] / eager["patched_s"],
                                "fused_wins": fused["ratio"] < eager["ratio"]}
    return summary


# -- NVAE with its own AMP -------------------------------------------------------------------------
def nvae_amp(cfg: dict, ctx: Context) -> dict:
    steps, batch = cfg["steps"], cfg["batch"]
    result = {"device": ctx.device, "model": cfg["model_name"], "batch": batch, "lr": cfg["lr"], "steps": steps,
              "warmup": cfg["warmup"], "variants": cfg["variants"], "rows": []}
    data = gpu_runs.make_data(ctx.work / "data-nvae", "nvae", n_train=(steps + 1) * batch, n_test=8)
    last = 0.0
    for variant in cfg["variants"]:
        if ctx.left() < max(1.2 * last, 10):
            result["rows"].append({"variant": variant, "ok": False, "error": f"skipped: {ctx.left():.0f} s left"})
            continue
        out = ctx.work / "runs" / "nvae-amp" / _safe(variant)
        shutil.rmtree(out, ignore_errors=True)
        command = gpu_runs.nvae_command(ctx.python, out, data, variant, steps, gpu_runs.free_port(), ctx.cpu,
                                        cfg["model_args"], batch, cfg["lr"])
        run = gpu_runs.run_logged(command, ctx.log(f"nvae-amp-{_safe(variant)}"), ctx.left())
        last = run["seconds"]
        row = {"variant": variant, **run, **gpu_runs.check_run(out, steps, ctx.device, cfg["warmup"])}
        result["rows"].append(row)
        _ratios(result["rows"], next((r for r in result["rows"] if r["variant"] == "vanilla"), None),
                time_ratio="median_step_s")
        ctx.emit(result)
    result["ok"] = all(r.get("ok") for r in result["rows"])
    return result


def _ratios(rows, base, **keys):
    """``row[name] = row[key] / base[key]`` for each ``name=key``; None where either is missing or 0."""
    for row in rows:
        for name, key in keys.items():
            row[name] = row[key] / base[key] if base and base.get(key) and row.get(key) else None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# -- the launchers' CUDA path ----------------------------------------------------------------------
def launcher(cfg: dict, ctx: Context) -> dict:
    steps = cfg["steps"]
    result = {"device": ctx.device, "steps": steps, "runs": {}}
    mpiexec = shutil.which("mpiexec")
    jobs = {
        "vdvae": lambda out, data: gpu_runs.vdvae_command(ctx.python, out, data, cfg["vdvae_variant"], steps,
                                                          gpu_runs.free_port(), ctx.cpu, cfg["vdvae_args"], mpiexec),
        "nvae": lambda out, data: gpu_runs.nvae_command(ctx.python, out, data, cfg["nvae_variant"], steps,
                                                        gpu_runs.free_port(), ctx.cpu, cfg["nvae_args"],
                                                        cfg["nvae_batch"]),
    }
    for name, command_for in jobs.items():
        if ctx.left() < 10:
            result["runs"][name] = {"ok": False, "error": f"skipped: {ctx.left():.0f} s left"}
            continue
        try:
            if name == "vdvae":  # VDVAE holds 5000 training images out for validation
                data = gpu_runs.make_data(ctx.work / "data-vdvae", "vdvae", 5000 + (steps + 1) * cfg["vdvae_batch"], 20)
            else:
                data = gpu_runs.make_data(ctx.work / "data-nvae-launcher", "nvae", (steps + 1) * cfg["nvae_batch"], 8)
            out = ctx.work / "runs" / "launcher" / name
            shutil.rmtree(out, ignore_errors=True)
            command = command_for(out, data)
            run = gpu_runs.run_logged(command, ctx.log(f"launcher-{name}"), ctx.left())
            row = {"command_head": " ".join(Path(c).name for c in command[:command.index("--variant")]), **run,
                   **gpu_runs.check_run(out, steps, ctx.device)}
            row["problems"] += _shim_problems(row.get("compat") or [], ctx.cpu)
            if name == "vdvae" and not mpiexec:
                row["problems"].append("no mpiexec on PATH: ran as an MPI singleton")
            row["ok"] = row["ok"] and not row["problems"] and run["returncode"] == 0
        except Exception as err:  # noqa: BLE001 - the other launcher still runs
            row = {"ok": False, "error": _error(err), "traceback": traceback.format_exc()[-2000:]}
        result["runs"][name] = row
        ctx.emit(result)
    result["ok"] = all(r.get("ok") for r in result["runs"].values())
    return result


def _shim_problems(compat: list, cpu: bool) -> list:
    """On CUDA no CPU shim may be on (nccl, .cuda(), set_device and DDP device ids are upstream's own);
    with --cpu the gloo one must be."""
    cpu_shims = [name for name in compat if name.startswith("cpu-")]
    if cpu and "cpu-gloo" not in compat:
        return ["--cpu run without the cpu-gloo shim"]
    if not cpu and cpu_shims:
        return [f"CPU shims on in a CUDA run: {', '.join(cpu_shims)}"]
    return []


# -- OU cost ---------------------------------------------------------------------------------------
def ou_cost(cfg: dict, ctx: Context) -> dict:
    from vaepatch.bench.cost.ou_smoothing import RHO

    result = {"device": ctx.device, "rho": RHO, "samples": cfg["samples"], "steps": cfg["steps"],
              "warmup": cfg["warmup"], "rows": []}
    for kind in cfg["references"]:
        if ctx.left() < 5:
            result["rows"].append({"reference": kind, "error": f"skipped: {ctx.left():.0f} s left"})
            continue
        try:
            result["rows"] += _ou_rows(kind, cfg["samples"], cfg["steps"], cfg["warmup"], ctx.device)
        except Exception as err:  # noqa: BLE001 - the other reference still runs
            result["rows"].append({"reference": kind, "error": _error(err),
                                   "traceback": traceback.format_exc()[-2000:]})
        ctx.emit(result)
    result["ok"] = all(not r.get("error") for r in result["rows"])
    return result


OU_REFERENCES = {"mlp": "MLP 40-40-40-40, batch 100", "vdvae": "tiny VDVAE (width 32, batch 16)"}


def _ou_rows(kind: str, samples: int, steps: int, warmup: int, device: str) -> list:
    """Plain vs OU with ``samples`` copies on ``device`` (``ou_cost.measure_configs``): time, memory, FLOPs."""
    from vaepatch.bench.cost.ou_smoothing import measure_configs

    rows = [{"reference": OU_REFERENCES[kind], "config": "plain" if r["samples"] is None else f"OU K={r['samples']}",
             "samples": r["samples"], "seconds": r["seconds"], "memory_bytes": r.get("peak", r.get("saved")),
             "flops": r["flops"]} for r in measure_configs(kind, [samples], steps, warmup, device)]
    _ratios(rows, rows[0], time_ratio="seconds", memory_ratio="memory_bytes", flop_ratio="flops")
    return rows


SECTIONS = {"preflight": preflight, "vdvae-step-time": vdvae_step_time, "nvae-amp": nvae_amp, "launcher": launcher,
            "ou-cost": ou_cost}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaepatch.bench.gpu.sections", description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--config", required=True, help="the check's config JSON (vaepatch bench gpu writes it)")
    parser.add_argument("--part", required=True, help="where this section's result goes (JSON, rewritten per row)")
    parser.add_argument("--seconds", type=float, required=True, help="this section's time")
    args = parser.parse_args(argv)
    config = read_json(args.config)
    if config is None:
        parser.error(f"{args.config}: not a readable JSON object")
    ctx = Context(config, Path(args.part), args.seconds)
    if config.get("threads"):
        import torch

        torch.set_num_threads(config["threads"])
    ctx.emit({}, "running")
    try:
        result = SECTIONS[args.section](config["sections"][args.section], ctx)
    except Exception as err:  # noqa: BLE001 - recorded for the report; the orchestrator moves on
        ctx.emit(ctx.result, "error", f"{_error(err)}\n{traceback.format_exc()[-3000:]}")
        return 1
    ctx.emit(result, section_status(result.get("ok", True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
