"""`vaepatch run vdvae`: upstream train.py with a variant applied and every training step logged.

One process per MPI rank (``mpiexec -n N vaepatch run vdvae ...``), as upstream runs. Each
process finds and verifies the clone, switches on the compat shims this machine needs,
applies the variant, then runs the clone's own ``train.py`` — its ``main()``, with
``sys.argv`` and ``__main__`` as its ``if __name__ == "__main__"`` guard would have them —
while recording each ``training_step`` as one line of ``OUT/events.jsonl``. VDVAE's own
logs and checkpoints go where they always go (``--save_dir``/``--desc``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
from pathlib import Path

from vaepatch import cifar_format, upstream
from vaepatch.api import apply
from vaepatch.patching import Patch, PatchSet
from vaepatch.runs import manifest as run_manifest
from vaepatch.runs.prerun import (check_max_steps, choose_fuse, find_clone, record_end, require_device,
                                  resolve_variant, run_main, shim_record)
from vaepatch.runs.manifest import LaunchError
from vaepatch.runs.events import STALL_STEPS
from vaepatch.runs.recorder import StopAtMaxSteps
from vaepatch.runs.script import load_script
from vaepatch.targets.vdvae.patch import UPSTREAM_SCALE
from vaepatch.targets.vdvae.recorder import StepRecorder
from vaepatch.targets.vdvae.shims import install as install_shims

__all__ = ["LaunchError", "StopAtMaxSteps", "check_vdvae_args", "run_vdvae", "StepRecorder", "load_script",
           "add_arguments", "run_from_args", "LOSS_UNIT"]

LOSS_UNIT = "nats/dim"  # VDVAE's elbo is per pixel channel; report.py turns it into bits/dim


def check_vdvae_args(train_args: list[str]):
    """Parse ``train_args`` with upstream's own parser; catch its traps with a clear message.

    Returns upstream's Hyperparams. Needs the clone on ``sys.path``.
    """
    hps = importlib.import_module("hps")
    parser = hps.add_vae_arguments(argparse.ArgumentParser(prog="train.py"))
    given = parser.parse_args(train_args)  # argparse's own errors: usage + exit 2
    known = sorted(hps.HPARAMS_REGISTRY)
    if not given.hparam_sets:
        raise LaunchError(
            "VDVAE needs --hps, a named hyperparameter set (upstream fails with \"'NoneType' object has "
            f"no attribute 'split'\" without it); known sets: {', '.join(known)}. "
            "Example: vaepatch run vdvae --variant upbounded1 --out runs/a -- --hps cifar10 --data_root DATA")
    unknown = [s for s in given.hparam_sets.split(",") if s and s not in hps.HPARAMS_REGISTRY]
    if unknown:
        raise LaunchError(f"unknown VDVAE hyperparameter set(s) {', '.join(unknown)} in --hps; "
                          f"known: {', '.join(known)}")
    H = hps.Hyperparams()
    hps.parse_args_and_update_hparams(H, parser, s=train_args)
    if H.warmup_iters == 0:
        raise LaunchError(
            "--warmup_iters 0: VDVAE's learning-rate warm-up divides by it (ZeroDivisionError at the first "
            "step). Pass --warmup_iters 1 or more (the cifar10 set uses 100).")
    return H


def _require_mpi4py() -> None:
    if importlib.util.find_spec("mpi4py") is None:
        raise LaunchError("VDVAE's train.py runs under MPI through mpi4py, which is not installed. "
                          "run: pip install 'vaepatch[mpi]'   (on a cluster: mpi4py built against its MPI)")


def run_vdvae(variant: str, out: str | os.PathLike, train_args: list[str], *, upstream_path=None,
              cpu: bool = False, max_steps: int | None = None, fuse: bool | None = None,
              strict: bool = True, stall_steps: int = STALL_STEPS, stop_when_stalled: bool = False,
              provenance: bool = True, stop_at_nonfinite: bool = False) -> dict:
    """Run openai/vdvae's train.py with ``variant``; returns the final run.json contents.

    A run is stalled after ``stall_steps`` steps in a row without an update: run.json says since when
    (``stalled_since``), and with ``stop_when_stalled`` the run stops there.
    """
    resolved = resolve_variant(variant)  # unknown variant: clear error before anything starts
    check_max_steps(max_steps)
    location = find_clone("vdvae", upstream_path, strict, "openai/vdvae")
    _require_mpi4py()
    require_device(cpu)
    upstream.add_to_path(location)
    H = check_vdvae_args(train_args)
    check_data(H)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    out = Path(out).resolve()
    manifest_path = out / run_manifest.FILENAME
    previous = run_manifest.previous(out, resolved.spec)
    comm.Barrier()  # every rank has checked the old manifest before rank 0 rewrites it

    def on_stall(since):
        if rank == 0:
            manifest["stalled_since"] = since
            run_manifest.write(manifest_path, manifest)

    sides = (resolved.posterior or UPSTREAM_SCALE, resolved.prior or UPSTREAM_SCALE)
    recorder = StepRecorder(max_steps=max_steps, scales=sides, provenance=provenance, stall_steps=stall_steps,
                            stop_when_stalled=stop_when_stalled, on_stall=on_stall,
                            stop_at_nonfinite=stop_at_nonfinite)
    writer = recorder.open(out / "events.jsonl", rank, tensorboard=out)  # TensorBoard files beside the events
    manifest = previous or run_manifest.new("vdvae", variant, resolved.spec,
                                            upstream_commit=upstream.pin("vdvae").commit,
                                            seed=H.seed, argv=train_args, loss_unit=LOSS_UNIT)
    if writer.resumed_from is not None and not H.restore_path:
        recorder.close()
        raise LaunchError(f"{out / 'events.jsonl'} already has steps up to {writer.resumed_from} from an earlier "
                          "attempt, and this one starts from scratch (no --restore_path): its steps would mix "
                          "two trajectories. Continue with VDVAE's --restore_* flags, or use a new --out.")
    shims = install_shims(cpu)
    fuse, fuse_reason = choose_fuse(fuse, cpu, resolved)
    if rank == 0:
        print(f"vaepatch: block math {fuse_reason}", flush=True)
    handle = None
    session = {"started": run_manifest.now(), "argv": list(train_args), "resumed_after_step": writer.resumed_from}
    manifest.update(
        world_size=world, device="cpu" if cpu else "cuda", fuse=fuse, fuse_reason=fuse_reason,
        compat=shim_record(shims), max_steps=max_steps, stall_steps=stall_steps, stop_when_stalled=stop_when_stalled,
        stop_at_nonfinite=stop_at_nonfinite,
        upstream_path=str(location), upstream_logdir=str(Path(H.save_dir or ".", H.desc or "test").resolve()),
        status="running", ended=None)
    manifest.setdefault("sessions", []).append(session)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        run_manifest.write(manifest_path, manifest)
    if writer.resumed_from is not None and rank == 0:
        print(f"vaepatch: {out / 'events.jsonl'} already has steps up to {writer.resumed_from}; "
              "steps re-run after a restore are not logged twice", flush=True)

    status = "crashed"
    try:
        handle = apply(resolved, target="vdvae", upstream=location, strict=strict, fuse=fuse)
        train_py = location / "train.py"
        train, _ = load_script(train_py)  # its guard only calls main()
        hooks = PatchSet([
            Patch(train, "training_step", recorder.training_step(train.training_step)),
            Patch(train, "get_cpu_stats_over_ranks", recorder.stats_over_ranks(train.get_cpu_stats_over_ranks)),
        ], label="vaepatch step recorder").apply()
        try:
            status = run_main(train, [str(train_py), *train_args])
        finally:
            hooks.revert()
    except BaseException as e:
        status = f"crashed: {type(e).__name__}: {e}"
        raise
    finally:
        record_end(manifest, session, status, recorder, out, stall_steps, rank)
        if handle is not None:
            handle.revert()
        shims.revert()
    return manifest


DATASET_FILES = {  # what VDVAE's data.py opens under --data_root, per --dataset (cifar10: cifar_format.missing)
    "imagenet32": ["imagenet32-train.npy", "imagenet32-valid.npy"],
    "imagenet64": ["imagenet64-train.npy", "imagenet64-valid.npy"],
    "ffhq_256": ["ffhq-256.npy"],
    "ffhq_1024": ["ffhq1024/train", "ffhq1024/valid"],
}
DATASET_SOURCES = {"cifar10": f"{cifar_format.CIFAR_SOURCE} (VDVAE's setup_cifar10.sh fetches the same), or "
                              "for a smoke run `vaepatch make-data DIR`",
                   "imagenet32": "VDVAE's setup_imagenet.sh imagenet32",
                   "imagenet64": "VDVAE's setup_imagenet.sh imagenet64",
                   "ffhq_256": "VDVAE's setup_ffhq256.sh", "ffhq_1024": "VDVAE's setup_ffhq1024.sh"}


def check_data(H) -> None:
    """Every file VDVAE will open for ``--dataset`` under ``--data_root``, before upstream starts."""
    root = Path(H.data_root or ".")
    if H.dataset == "cifar10":
        missing = cifar_format.missing(root)
    else:
        missing = [f for f in DATASET_FILES.get(H.dataset, []) if not (root / f).exists()]
    if missing:
        raise LaunchError(f"no {H.dataset} data under --data_root {root}: missing {', '.join(missing)}. "
                          f"Get it from {DATASET_SOURCES[H.dataset]} (--data_root is the folder that holds them).")


def add_arguments(parser) -> None:
    """``vaepatch run vdvae``'s own options: none beyond the common ones (``--fuse`` among them)."""


def run_from_args(args, train_args: list) -> dict:
    """``vaepatch run vdvae`` with the parsed command line."""
    stop = getattr(args, "stop_when_stalled", None)
    return run_vdvae(args.variant, args.out, train_args, upstream_path=args.upstream, cpu=args.cpu,
                     max_steps=args.max_steps, fuse=args.fuse, strict=not args.no_strict,
                     stall_steps=stop or STALL_STEPS, stop_when_stalled=stop is not None,
                     stop_at_nonfinite=getattr(args, "stop_at_nonfinite", False))
