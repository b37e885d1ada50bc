"""`vaepatch run nvae`: NVlabs/NVAE's train.py with a variant applied and every training step logged.

NVAE starts its processes itself: ``--num_process_per_node N`` makes its ``__main__`` block
start one ``torch.multiprocessing.Process`` per GPU, each running ``init_processes`` then
``main(args)``; with N = 1 it calls ``init_processes`` in place. The launcher runs that block
as it is, with two substitutions: ``Process`` starts a *spawned* process whose entry point
(:func:`_process_main`) sets itself up from scratch (compat shims, the variant, the step
recorder), so the variant reaches every process whether or not the parent's state would have
been inherited; and ``init_processes`` (in place, N = 1) runs under the parent's own setup.

Per step and process, one line of ``OUT/events.jsonl`` (vaepatch.runs.events), recorded without
touching NVAE's training loop: ``train()``'s data queue marks where a step starts (and stops
the run cleanly at ``--max-steps``), and NVAE's ``GradScaler`` is replaced by a subclass that
sees the loss (``scale``), the gradients (``step``) and whether AMP skipped the update
(``update``: the scale backs off exactly when inf/NaN gradients were found). ``reason`` is
``"nan"`` for a non-finite loss of this process, ``"amp"`` for a finite loss whose update AMP
skipped. NVAE has no skip rule of its own; ``--skip-nonfinite`` adds VDVAE's (skip the update
on a non-finite loss), so the two upstreams can be compared. On CPU AMP is off (GradScaler and
autocast disable themselves without CUDA): a non-finite loss is then applied unless the guard
is on.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from vaepatch import cifar_format, upstream
from vaepatch.api import apply
from vaepatch.patching import Patch, PatchSet
from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest
from vaepatch.runs.prerun import (check_max_steps, choose_fuse, destroy_process_group, find_clone,
                                  require_device, resolve_variant, shim_record, stalled_since)
from vaepatch.runs.manifest import LaunchError
from vaepatch.runs.events import STALL_STEPS
from vaepatch.runs.recorder import StopRun
from vaepatch.runs.script import load_script
from vaepatch.targets.nvae.patch import UPSTREAM_SCALE
from vaepatch.targets.nvae.recorder import StepRecorder, recording_scaler
from vaepatch.targets.nvae.shims import install as install_shims
from vaepatch.variant import Variant

__all__ = ["run_nvae", "StepRecorder", "recording_scaler", "LOSS_UNIT", "add_arguments", "run_from_args"]

# NVAE's training loss: mean over the batch of the per-image negative ELBO (nats, KL-annealed and
# balanced) plus its spectral and batch-norm regularizers -- what GradScaler.scale receives.
LOSS_UNIT = "nats/image"
UPSTREAM_MASTER_PORT = 6020  # NVAE's init_processes hard-codes it
_STOPPED = 75  # exit code of a process that stopped cleanly at --max-steps


@dataclass(frozen=True)
class Setup:
    """Everything a process needs to set itself up (picklable: it crosses a spawn)."""

    variant: Variant
    out: str
    upstream: str
    cpu: bool
    strict: bool
    max_steps: int | None
    skip_nonfinite: bool
    master_port: int | None
    stall_steps: int = STALL_STEPS
    stop_when_stalled: bool = False
    provenance: bool = True
    stop_at_nonfinite: bool = False
    fuse: bool = False


def _master_port_patch(port: int) -> Patch:
    """NVAE sets MASTER_PORT=6020 right before init_process_group: put ``port`` there instead."""
    import torch.distributed as dist

    original = dist.init_process_group

    def init_process_group(*args, **kwargs):
        os.environ["MASTER_PORT"] = str(port)
        return original(*args, **kwargs)

    return Patch(dist, "init_process_group", init_process_group)


class _Process:
    """What one process switched on (shims, variant, recorder hooks), and how to undo it."""

    def __init__(self, setup: Setup):
        self.setup = setup
        location = Path(setup.upstream)
        upstream.add_to_path(location)
        sides = (setup.variant.posterior or UPSTREAM_SCALE, setup.variant.prior or UPSTREAM_SCALE)
        self.recorder = StepRecorder(max_steps=setup.max_steps, skip_nonfinite=setup.skip_nonfinite, scales=sides,
                                     provenance=setup.provenance, stall_steps=setup.stall_steps,
                                     stop_when_stalled=setup.stop_when_stalled, on_stall=self._on_stall,
                                     stop_at_nonfinite=setup.stop_at_nonfinite)
        self.rank = None
        self.shims = install_shims(setup.cpu)
        self.handle = self.hooks = None
        try:
            self.handle = apply(setup.variant, target="nvae", upstream=location, strict=setup.strict, fuse=setup.fuse)
            self.train, self.guard = load_script(location / "train.py")
            utils = self.train.utils
            patches = [Patch(self.train, "train", self.recorder.train(self.train.train)),
                       Patch(self.train, "GradScaler", recording_scaler(self.train.GradScaler, self.recorder)),
                       Patch(utils, "reconstruction_loss",
                             self.recorder.reconstruction_loss(utils.reconstruction_loss))]
            if setup.master_port is not None:
                patches.append(_master_port_patch(setup.master_port))
            self.hooks = PatchSet(patches, label="vaepatch NVAE step recorder").apply()
        except BaseException:
            self.undo()
            raise

    def _on_stall(self, since) -> None:
        """Rank 0 marks run.json as soon as the run stalls (the launcher recomputes it at the end)."""
        path = Path(self.setup.out) / run_manifest.FILENAME
        if self.rank == 0 and path.exists():
            manifest = run_manifest.read(path)
            manifest["stalled_since"] = since
            run_manifest.write(path, manifest)

    def run(self, rank: int, size: int, args, init_processes) -> None:
        """NVAE's ``init_processes(rank, size, main, args)`` with this process's events open."""
        self.rank = rank
        # TensorBoard scalars into NVAE's own summary folder (its Writer's, root/eval-save), beside its curves
        self.recorder.open(Path(self.setup.out) / events.FILENAME, rank, tensorboard=args.save)
        try:
            init_processes(rank, size, self.train.main, args)
        finally:
            self.recorder.close()
            destroy_process_group()
            self._record_weights()

    def _record_weights(self) -> None:
        """Rank 0 writes whether its weights ended finite into run.json (a spawned process has no other way
        to tell the launcher; the launcher keeps what is on disk)."""
        path = Path(self.setup.out) / run_manifest.FILENAME
        if self.rank == 0 and path.exists():
            manifest = run_manifest.read(path)
            manifest["weights_finite"] = self.recorder.weights_finite()
            run_manifest.write(path, manifest)

    def undo(self) -> None:
        if self.hooks is not None:
            self.hooks.revert()
        if self.handle is not None:
            self.handle.revert()
        self.shims.revert()


def _process_main(setup: Setup, rank: int, size: int, args) -> None:
    """Entry point of each process NVAE starts (spawned): set up, then run NVAE's init_processes."""
    process = _Process(setup)
    # NVAE's train() and test() read the module-level ``args`` its __main__ block binds; its own
    # (forked) processes inherit that binding, a spawned one gets it here
    process.train.args = args
    try:
        process.run(rank, size, args, process.train.init_processes)
    except StopRun:
        sys.exit(_STOPPED)
    finally:
        process.undo()


def _check_args(args, out: Path) -> None:
    """Catch what would fail late, or mix two runs, with a message that says what to do."""
    checkpoint = Path(args.save) / "checkpoint.pt"
    if args.cont_training and not checkpoint.is_file():
        raise LaunchError(f"--cont_training, but there is no checkpoint at {checkpoint} (NVAE's --root/eval---save). "
                          "Pass the --root and --save of the run to continue, or drop --cont_training.")
    if args.dataset == "cifar10":
        missing = cifar_format.missing(args.data)
        if missing:
            raise LaunchError(f"no CIFAR-10 under --data {args.data}: missing {', '.join(missing)}. Unpack "
                              f"{cifar_format.CIFAR_SOURCE} into {args.data} (NVAE never downloads here), or for a "
                              f"smoke run write a stand-in: vaepatch make-data {args.data} --for nvae")
    logged = events.read(out).events if (out / events.FILENAME).exists() else []
    if logged and not args.cont_training:
        raise LaunchError(f"{out / events.FILENAME} already has steps up to {max(e['step'] for e in logged)} from an "
                          "earlier attempt, and this one starts from scratch (no --cont_training): its steps would "
                          "mix two trajectories. Continue with --cont_training, or use a new --out.")


def run_nvae(variant: str, out: str | os.PathLike, train_args: list[str], *, upstream_path=None,
             cpu: bool = False, max_steps: int | None = None, strict: bool = True,
             skip_nonfinite: bool = False, master_port: int | None = None, stall_steps: int = STALL_STEPS,
             stop_when_stalled: bool = False, provenance: bool = True,
             stop_at_nonfinite: bool = False, fuse: bool | None = None) -> dict:
    """Run NVlabs/NVAE's train.py with ``variant``; returns the final run.json contents (``stalled_since``:
    see ``vaepatch.runs.recorder``). ``fuse``: as ``vaepatch run vdvae``'s (``choose_fuse``)."""
    resolved = resolve_variant(variant)
    check_max_steps(max_steps)
    location = find_clone("nvae", upstream_path, strict, "NVlabs/NVAE")
    require_device(cpu)
    out = Path(out).resolve()
    manifest_path = out / "run.json"
    previous = run_manifest.previous(out, resolved.spec)
    fuse, fuse_reason = choose_fuse(fuse, cpu, resolved)
    print(f"vaepatch: per-group math {fuse_reason}", flush=True)
    setup = Setup(resolved, str(out), str(location), cpu, strict, max_steps, skip_nonfinite, master_port,
                  stall_steps, stop_when_stalled, provenance, stop_at_nonfinite, fuse)
    manifest = previous or run_manifest.new("nvae", variant, resolved.spec, upstream_commit=upstream.pin("nvae").commit,
                                            seed=None, argv=train_args, loss_unit=LOSS_UNIT)
    session = {"started": run_manifest.now(), "argv": list(train_args)}
    state = {"writes_manifest": False, "processes": []}

    def begin(args) -> None:
        """Once, when NVAE's __main__ block has parsed its arguments: check them, write run.json."""
        if "args" in state:
            return
        state["args"] = args
        _check_args(args, out)
        manifest.update(
            seed=args.seed, world_size=args.num_proc_node * args.num_process_per_node,
            dims_per_image=int(process.train.utils.num_output(args.dataset)),
            device="cpu" if cpu else "cuda", fuse=fuse, fuse_reason=fuse_reason, compat=shim_record(process.shims),
            max_steps=max_steps, skip_nonfinite=skip_nonfinite, stall_steps=stall_steps,
            stop_when_stalled=stop_when_stalled, stop_at_nonfinite=stop_at_nonfinite,
            master_port=master_port if master_port is not None else UPSTREAM_MASTER_PORT,
            upstream_path=str(location), upstream_logdir=str(Path(args.save).resolve()), status="running", ended=None)
        manifest.setdefault("sessions", []).append(session)
        state["writes_manifest"] = args.node_rank == 0
        if state["writes_manifest"]:
            out.mkdir(parents=True, exist_ok=True)
            run_manifest.write(manifest_path, manifest)

    def init_processes_in_place(rank, size, fn, args):
        begin(args)
        process.run(rank, size, args, original_init_processes)

    def spawned_process(target=None, args=(), **kwargs):
        import torch.multiprocessing as mp

        rank, size, _main, nvae_args = args
        begin(nvae_args)
        child = mp.get_context("spawn").Process(target=_process_main, args=(setup, rank, size, nvae_args))
        state["processes"].append((rank, child))
        return child

    process = _Process(setup)
    original_init_processes = process.train.init_processes
    saved_argv = sys.argv
    status = "crashed"
    try:
        with PatchSet([Patch(process.train, "init_processes", init_processes_in_place),
                       Patch(process.train, "Process", spawned_process)], label="vaepatch NVAE processes"):
            sys.argv = [str(location / "train.py"), *train_args]
            try:
                exec(process.guard, process.train.__dict__)
                status = _children_status(state["processes"], max_steps, stalled_since(out, stall_steps),
                                          stop_when_stalled)
            except StopRun as stop:
                status = stop.status
    except BaseException as e:
        status = f"crashed: {type(e).__name__}: {e}"
        raise
    finally:
        sys.argv = saved_argv
        process.undo()
        session.update(status=status, ended=run_manifest.now())
        if state["processes"]:  # each spawned process logged its own steps; here, how each one ended
            session["exit_codes"] = {str(rank): child.exitcode for rank, child in state["processes"]}
        else:
            session["steps_logged"] = process.recorder.logged
        on_disk = run_manifest.read(manifest_path) if manifest_path.exists() else None
        manifest.update(status=status, ended=session["ended"], stalled_since=stalled_since(out, stall_steps),
                        weights_finite=(on_disk or {}).get("weights_finite"))
        if state["writes_manifest"]:
            run_manifest.write(manifest_path, manifest)
    return manifest


def _children_status(children, max_steps, stalled_since=None, stop_when_stalled=False) -> str:
    """The run's status from the exit codes of the processes NVAE started (none: ran in place)."""
    codes = {rank: child.exitcode for rank, child in children}
    failed = {rank: code for rank, code in codes.items() if code not in (0, _STOPPED)}
    if failed:
        raise RuntimeError("NVAE process(es) failed: " + ", ".join(f"rank {r} exit code {c}" for r, c in failed.items())
                           + " (their tracebacks are above)")
    if any(code == _STOPPED for code in codes.values()):
        if stop_when_stalled and stalled_since is not None:
            return f"stopped: stalled since step {stalled_since}"
        return f"stopped at --max-steps {max_steps}"
    return "completed"


def add_arguments(parser) -> None:
    """``vaepatch run nvae``'s own options."""
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip the update when the loss is non-finite, as VDVAE does (off: NVAE's own behaviour)")
    parser.add_argument("--master-port", type=int, metavar="P", help="port for the process group (NVAE fixes 6020)")


def run_from_args(args, train_args: list) -> dict:
    """``vaepatch run nvae`` with the parsed command line."""
    stop = getattr(args, "stop_when_stalled", None)
    return run_nvae(args.variant, args.out, train_args, upstream_path=args.upstream, cpu=args.cpu,
                    max_steps=args.max_steps, strict=not args.no_strict, skip_nonfinite=args.skip_nonfinite,
                    master_port=args.master_port, stall_steps=stop or STALL_STEPS, stop_when_stalled=stop is not None,
                    stop_at_nonfinite=getattr(args, "stop_at_nonfinite", False), fuse=args.fuse)
