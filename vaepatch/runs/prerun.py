"""What ``vaepatch run`` does the same way for every upstream before and after the training script.

Resolve the variant, find and verify the clone, check ``--max-steps`` and the device (each failure a
:class:`~vaepatch.runs.manifest.LaunchError` that says what to change), describe the installed shims
for ``run.json``, and tear the process group down after a crash without hiding the crash.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

from vaepatch import upstream
from vaepatch.runs import events
from vaepatch.runs import manifest as run_manifest
from vaepatch.runs.manifest import LaunchError
from vaepatch.variant import Variant

__all__ = ["resolve_variant", "check_max_steps", "find_clone", "require_device", "choose_fuse", "compile_works",
           "shim_record",
           "destroy_process_group", "stalled_since", "run_main", "record_end", "free_port"]


def resolve_variant(spec) -> Variant:
    """The variant, or a LaunchError naming what is wrong before anything starts."""
    try:
        return Variant.parse(spec)
    except ValueError as e:
        raise LaunchError(str(e)) from None


def check_max_steps(max_steps) -> None:
    if max_steps is not None and max_steps < 1:
        raise LaunchError(f"--max-steps must be at least 1, got {max_steps}")


def find_clone(name: str, path, strict: bool, repo: str) -> Path:
    """The verified clone of ``name`` (``path``, ``$VAEPATCH_<NAME>`` or the default place)."""
    location = upstream.locate(name, path)
    if location is None:
        raise LaunchError(f"no {repo} clone at {upstream.default_dest(name)} and "
                          f"${upstream.pin(name).env} is not set.\n"
                          f"run: vaepatch fetch {name}   (or pass --upstream PATH)")
    return upstream.verify(location, name, allow_dirty=not strict)


def require_device(cpu: bool) -> None:
    import torch

    if not cpu and not torch.cuda.is_available():
        raise LaunchError("no CUDA device is visible. Pass --cpu to run on CPU (slow; meant for smoke tests "
                          "and the small stress grid), or check CUDA_VISIBLE_DEVICES / the driver.")


def shim_record(installed) -> list:
    """The ``compat`` entry of run.json: each shim switched on and the upstream line it fixes."""
    return [{"name": s.name, "fixes": s.fixes} for s in installed.shims]


def destroy_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - tearing down after a crash must not hide the crash
        pass


def stalled_since(out: Path, stall_steps: int):
    """From the events on disk: the first step of the final no-update streak if the run is stalled, else None."""
    try:
        return events.count(events.read(out), stall_steps).stalled_since
    except FileNotFoundError:
        return None


def run_main(train: types.ModuleType, argv: list[str]) -> str:
    """Call a loaded training script's ``main()`` as its own ``__main__`` with ``argv`` (both put back
    after); the run's status: ``"completed"``, or the status a :class:`StopRun` carries (max steps,
    stalled). A script that ``exit()``s cleanly after its last step has completed; anything else raises."""
    from vaepatch.runs.recorder import StopRun

    saved_argv, saved_main = sys.argv, sys.modules.get("__main__")
    sys.argv, sys.modules["__main__"] = list(argv), train
    try:
        train.main()
    except StopRun as stop:
        return stop.status
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    finally:
        sys.argv = saved_argv
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
    return "completed"


def record_end(manifest: dict, session: dict, status: str, recorder, out: Path, stall_steps: int, rank: int) -> None:
    """However the run ended: close its event log, write the ending into this session and ``run.json``
    (rank 0: status, time, steps logged, a final stall, whether the weights are finite), then tear the
    process group down."""
    recorder.close()
    session.update(status=status, ended=run_manifest.now(), steps_logged=recorder.logged)
    manifest.update(status=status, ended=session["ended"], stalled_since=stalled_since(out, stall_steps),
                    weights_finite=recorder.weights_finite())
    if rank == 0:
        run_manifest.write(out / run_manifest.FILENAME, manifest)
    destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now: each run's process group needs its own."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compile_works(device: str) -> tuple[bool, str]:
    """Whether ``torch.compile`` builds and runs a small elementwise function on ``device`` here (a C++
    compiler on CPU, Triton on CUDA), and if not, why."""
    import torch

    try:
        fn = torch.compile(lambda x: torch.expm1(x) * 0.5 - x, dynamic=True)
        fn(torch.ones(8, device=device))
        return True, ""
    except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
        return False, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def choose_fuse(requested: bool | None, cpu: bool, variant: Variant) -> tuple[bool, str]:
    """``vaepatch run``'s choice of fused (torch.compile) or eager block math, and the line that says why.

    Default: fused on a GPU when torch.compile works there (each block's math is then a few kernels
    instead of ~25 launches), eager on CPU, where the fused step measures no faster (VDVAE) or
    ~2% slower (NVAE: docs/results/cost.md) and compiling would add 10-30 s to every run.
    ``--fuse`` / ``--no-fuse`` (or ``$VAEPATCH_FUSE``) decide instead.
    """
    if variant.is_vanilla:
        return False, "vanilla: nothing is patched"
    env = os.environ.get("VAEPATCH_FUSE", "").strip().lower()
    if requested is None and env:
        requested, how = env in ("1", "true", "yes", "on"), f"$VAEPATCH_FUSE={env}"
    else:
        how = "--fuse" if requested else "--no-fuse"
    if requested is not None:
        return requested, f"{'fused (torch.compile)' if requested else 'eager'}, as asked ({how})"
    if cpu:
        return False, "eager (on CPU the fused step is no faster and compiling costs 10-30 s; --fuse to compile)"
    ok, why = compile_works("cuda")
    return (True, "fused with torch.compile (it works on this machine; --no-fuse for eager)") if ok else \
        (False, f"eager: torch.compile does not work on this machine ({why})")
