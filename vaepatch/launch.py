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
import ast
import builtins
import datetime
import importlib
import importlib.util
import json
import math
import os
import socket
import sys
import time
import types
from pathlib import Path

import vaepatch
from vaepatch import compat, upstream
from vaepatch.events import EventWriter
from vaepatch.patching import Patch, PatchSet
from vaepatch.variant import Variant

__all__ = ["LaunchError", "check_vdvae_args", "run_vdvae", "load_script", "main"]


class LaunchError(RuntimeError):
    """The run cannot start as asked; the message says what to change."""


class StopAtMaxSteps(Exception):
    """Raised from inside the training loop when --max-steps is reached (a clean stop)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


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
        raise LaunchError(f"unknown VDVAE hyperparameter set(s) {', '.join(unknown)} in --hps; known: {', '.join(known)}")
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


def _require_device(cpu: bool) -> None:
    import torch

    if not cpu and not torch.cuda.is_available():
        raise LaunchError("no CUDA device is visible. Pass --cpu to run on CPU (slow; meant for smoke tests "
                          "and the small stress grid), or check CUDA_VISIBLE_DEVICES / the driver.")


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either quote style, either operand order)."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Eq)):
        return False
    sides = [node.test.left, *node.test.comparators]
    return ({type(side) for side in sides} == {ast.Name, ast.Constant}
            and {getattr(side, "id", getattr(side, "value", None)) for side in sides} == {"__name__", "__main__"})


def load_script(path: Path) -> tuple[types.ModuleType, types.CodeType]:
    """Execute a script's definitions without its ``if __name__ == "__main__":`` block, so the
    launcher can wrap functions before anything runs; returns the module (``__name__`` set to
    ``"__main__"`` afterwards) and the block's body, compiled, for ``exec(guard, module.__dict__)``.
    Line numbers in tracebacks are the script's own.
    """
    tree = ast.parse(path.read_text(), str(path))
    guards = [node for node in tree.body if _is_main_guard(node)]
    definitions = ast.Module([node for node in tree.body if node not in guards], type_ignores=[])
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=str(path), __builtins__=builtins, __name__="__vaepatch_train__")
    exec(compile(definitions, str(path), "exec"), module.__dict__)
    module.__name__ = "__main__"
    guard = ast.Module([stmt for node in guards for stmt in node.body], type_ignores=[])
    return module, compile(guard, str(path), "exec")


class StepRecorder:
    """Wraps upstream's ``training_step`` to write one event per call, with the truth about the step.

    ``reason`` follows VDVAE's own rule (a NaN mean loss on any rank, or a grad norm at or above
    ``skip_threshold`` / NaN), except that any non-finite loss counts as ``"nan"``: upstream checks
    only ``isnan``, so an inf loss is skipped only through its grad norm.
    """

    def __init__(self, writer: EventWriter, max_steps: int | None = None):
        self.writer = writer
        self.max_steps = max_steps
        self._in_step = False
        self._local_loss = None
        self.logged = 0
        self.already_logged = 0

    def stats_over_ranks(self, original):
        """Wrap ``get_cpu_stats_over_ranks`` to keep this rank's own loss before ranks are averaged."""
        def get_cpu_stats_over_ranks(stat_dict):
            if self._in_step and "elbo" in stat_dict:
                loss = stat_dict["elbo"]
                self._local_loss = float(loss.detach() if hasattr(loss, "detach") else loss)
            return original(stat_dict)
        return get_cpu_stats_over_ranks

    def training_step(self, original):
        def training_step(H, data_input, target, vae, ema_vae, optimizer, iterate):
            if self.max_steps is not None and iterate >= self.max_steps:
                raise StopAtMaxSteps(iterate)
            self._in_step, self._local_loss = True, None
            start = time.perf_counter()
            try:
                stats = original(H, data_input, target, vae, ema_vae, optimizer, iterate)
            finally:
                self._in_step = False
            elapsed = time.perf_counter() - start
            self.record(iterate, stats, elapsed)
            return stats
        return training_step

    def record(self, step, stats, elapsed) -> None:
        mean_loss = float(stats["elbo"])
        any_rank_nonfinite = (not math.isfinite(mean_loss) or stats.get("distortion_nans", 0) > 0
                              or stats.get("rate_nans", 0) > 0)
        skipped = bool(stats["skipped_updates"])
        reason = None if not skipped else ("nan" if any_rank_nonfinite else "grad")
        loss = self._local_loss if self._local_loss is not None else mean_loss
        if self.writer.write(step=int(step), loss=loss, grad_norm=float(stats["grad_norm"]),
                             skipped=skipped, reason=reason, time=elapsed):
            self.logged += 1
        else:
            self.already_logged += 1


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise LaunchError(f"{path} exists but is not readable JSON ({e}); move it aside or use another --out") from None


def previous_manifest(out: Path, variant: Variant) -> dict | None:
    """The run.json already in ``out``, if any; refuses one made with another variant."""
    previous = _read_manifest(out / "run.json")
    if previous is not None and previous.get("variant_spec") != variant.spec:
        raise LaunchError(f"{out} already holds a run of variant {previous.get('variant')!r} "
                          f"({previous.get('variant_spec')}); use another --out, or --variant "
                          f"{previous.get('variant')!r} to continue that run")
    return previous


def _write_manifest(path: Path, manifest: dict) -> None:
    """Atomic replace: a crash while writing never leaves a half-written run.json."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_vdvae(variant: str, out: str | os.PathLike, train_args: list[str], *, upstream_path=None,
              cpu: bool = False, max_steps: int | None = None, fuse: bool | None = None,
              strict: bool = True) -> dict:
    """Run openai/vdvae's train.py with ``variant``; returns the final run.json contents."""
    try:
        resolved = Variant.parse(variant)  # unknown variant: clear error before anything starts
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if max_steps is not None and max_steps < 1:
        raise LaunchError(f"--max-steps must be at least 1, got {max_steps}")
    location = upstream.locate("vdvae", upstream_path)
    if location is None:
        raise LaunchError(f"no openai/vdvae clone at {upstream.default_dest('vdvae')} and $VAEPATCH_VDVAE is not set.\n"
                          "run: vaepatch fetch vdvae   (or pass --upstream PATH)")
    location = upstream.verify(location, "vdvae", allow_dirty=not strict)
    _require_mpi4py()
    _require_device(cpu)
    upstream.add_to_path(location)
    H = check_vdvae_args(train_args)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    out = Path(out).resolve()
    manifest_path = out / "run.json"
    previous = previous_manifest(out, resolved)
    comm.Barrier()  # every rank has checked the old manifest before rank 0 rewrites it

    writer = EventWriter(out / "events.jsonl", rank=rank)
    manifest = previous or {
        "target": "vdvae", "variant": str(variant), "variant_spec": resolved.spec,
        "upstream_commit": upstream.pin("vdvae").commit, "vaepatch_version": vaepatch.__version__,
        "seed": H.seed, "argv": list(train_args), "host": socket.gethostname(), "started": _now(),
        "loss_unit": "nats/dim",  # VDVAE's elbo is per pixel channel; report.py turns it into bits/dim
    }
    if writer.resumed_from is not None and not H.restore_path:
        writer.close()
        raise LaunchError(f"{out / 'events.jsonl'} already has steps up to {writer.resumed_from} from an earlier "
                          "attempt, and this one starts from scratch (no --restore_path): its steps would mix "
                          "two trajectories. Continue with VDVAE's --restore_* flags, or use a new --out.")
    shims = compat.install(compat.needed(cpu))
    handle = None
    saved_argv, saved_main = sys.argv, sys.modules.get("__main__")
    session = {"started": _now(), "argv": list(train_args), "resumed_after_step": writer.resumed_from}
    manifest.update(
        world_size=world, device="cpu" if cpu else "cuda", fuse=bool(fuse) if fuse is not None else None,
        compat=[{"name": s.name, "fixes": s.fixes} for s in shims.shims], max_steps=max_steps,
        upstream_path=str(location), upstream_logdir=str(Path(H.save_dir or ".", H.desc or "test").resolve()),
        status="running", ended=None)
    manifest.setdefault("sessions", []).append(session)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_manifest(manifest_path, manifest)
    if writer.resumed_from is not None and rank == 0:
        print(f"vaepatch: {out / 'events.jsonl'} already has steps up to {writer.resumed_from}; "
              "steps re-run after a restore are not logged twice", flush=True)

    recorder = StepRecorder(writer, max_steps)
    status = "crashed"
    try:
        handle = vaepatch.apply(resolved, target="vdvae", upstream=location, strict=strict, fuse=fuse)
        train_py = location / "train.py"
        train, _ = load_script(train_py)  # its guard only calls main()
        hooks = PatchSet([
            Patch(train, "training_step", recorder.training_step(train.training_step)),
            Patch(train, "get_cpu_stats_over_ranks", recorder.stats_over_ranks(train.get_cpu_stats_over_ranks)),
        ], label="vaepatch step recorder").apply()
        sys.argv, sys.modules["__main__"] = [str(train_py), *train_args], train
        try:
            train.main()
            status = "completed"
        except StopAtMaxSteps:
            status = f"stopped at --max-steps {max_steps}"
        finally:
            hooks.revert()
    except BaseException as e:
        status = f"crashed: {type(e).__name__}: {e}"
        raise
    finally:
        sys.argv = saved_argv
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        writer.close()
        session.update(status=status, ended=_now(), steps_logged=recorder.logged)
        manifest.update(status=status, ended=session["ended"])
        if rank == 0:
            _write_manifest(manifest_path, manifest)
        _destroy_process_group()
        if handle is not None:
            handle.revert()
        shims.revert()
    return manifest


def _destroy_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - tearing down after a crash must not hide the crash
        pass


USAGE = ("vaepatch run vdvae --variant V --out DIR [--upstream PATH] [--cpu] [--max-steps N] [--fuse] -- <train.py args>\n"
         "       vaepatch run nvae --variant V --out DIR [--upstream PATH] [--cpu] [--max-steps N] [--skip-nonfinite] "
         "[--master-port P] -- <train.py args>")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog="vaepatch run", usage=USAGE,
        description="Run an upstream training script with a variant applied; every step goes to OUT/events.jsonl. "
                    "VDVAE under MPI: mpiexec -n N vaepatch run vdvae ...; NVAE starts its own processes "
                    "(--num_process_per_node N after `--`).")
    parser.add_argument("target", choices=["vdvae", "nvae"], help="which upstream")
    parser.add_argument("--variant", required=True, help="built-in name (vaepatch variants), TOML path or inline spec")
    parser.add_argument("--out", required=True, help="run directory: run.json and events.jsonl go here")
    parser.add_argument("--upstream", help="path of the clone (default: $VAEPATCH_VDVAE / $VAEPATCH_NVAE, "
                                           "then third_party/<target>)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (gloo, no .cuda()); for smoke tests")
    parser.add_argument("--max-steps", type=int, help="stop cleanly after this global step count")
    parser.add_argument("--fuse", action="store_true", default=None, help="vdvae: torch.compile the patched block math")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="nvae: skip the update when the loss is non-finite, as VDVAE does (off: NVAE's own behaviour)")
    parser.add_argument("--master-port", type=int, help="nvae: port for the process group (NVAE fixes 6020)")
    parser.add_argument("--no-strict", action="store_true", help="patch a clone that differs from the pin (warns)")
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments {' '.join(extra)}: arguments for train.py go after `--`")
    only = {"fuse": ("vdvae", "--fuse"), "skip_nonfinite": ("nvae", "--skip-nonfinite"),
            "master_port": ("nvae", "--master-port")}
    for key, (target, flag) in only.items():
        if getattr(args, key) not in (None, False) and args.target != target:
            parser.error(f"{flag} is for `vaepatch run {target}`" + (
                " (VDVAE already skips non-finite losses itself)" if key == "skip_nonfinite" else ""))
    try:
        if args.target == "vdvae":
            manifest = run_vdvae(args.variant, args.out, train_args, upstream_path=args.upstream, cpu=args.cpu,
                                 max_steps=args.max_steps, fuse=args.fuse, strict=not args.no_strict)
        else:
            from vaepatch.launch_nvae import run_nvae

            manifest = run_nvae(args.variant, args.out, train_args, upstream_path=args.upstream, cpu=args.cpu,
                                max_steps=args.max_steps, strict=not args.no_strict,
                                skip_nonfinite=args.skip_nonfinite, master_port=args.master_port)
    except (LaunchError, upstream.UpstreamError, compat.CompatError) as e:
        print(f"vaepatch run: {e}", file=sys.stderr)
        return 2
    print(f"vaepatch run: {manifest['status']}; events in {Path(args.out) / 'events.jsonl'}", flush=True)
    return 0
