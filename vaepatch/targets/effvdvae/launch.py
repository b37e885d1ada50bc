"""`vaepatch run effvdvae`: Efficient-VDVAE's train.py with a variant applied and every training step logged.

Its train.py takes no arguments and reads ``./hparams.cfg``; it is meant for ``torchrun`` (env:// process
group, ``LOCAL_RANK``). The launcher writes the run's own ``OUT/hparams.cfg`` (``--config``: the clone's, by
default, or one of its ``egs/``; the ``section.key=value`` arguments after ``--`` on top) and works in ``OUT``,
where train.py also puts its checkpoint (``checkpoints-<run.name>``) and TensorBoard logs
(``logs-<run.name>``). It loads that configuration itself (once: train.py's own ``HParams('.', ...)`` gets the
same object), imports the upstream, switches on the shims this machine needs, applies the variant, then runs
train.py's definitions and its ``main()``, recording each ``train_step`` (``recorder.py``). Without
``torchrun`` it is one process with a process group of its own. The clone is never edited.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

from vaepatch import cifar_format, upstream
from vaepatch.api import apply
from vaepatch.patching import Patch, PatchSet
from vaepatch.runs import manifest as run_manifest
from vaepatch.runs import shims as runs_shims
from vaepatch.runs.events import FILENAME as EVENTS, STALL_STEPS
from vaepatch.runs.manifest import LaunchError
from vaepatch.runs.prerun import (check_max_steps, choose_fuse, find_clone, free_port, record_end, require_device,
                                  resolve_variant, run_main, shim_record)
from vaepatch.runs.script import load_script
from vaepatch.targets.effvdvae import config, shims
from vaepatch.targets.effvdvae.patch import upstream_scale
from vaepatch.targets.effvdvae.recorder import StepRecorder

__all__ = ["LOSS_UNIT", "run_effvdvae", "add_arguments", "run_from_args"]

LOSS_UNIT = "nats/dim"  # the events' loss: Efficient-VDVAE's NELBO per pixel channel (it logs bits/dim)
_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _process_env():
    """torchrun's environment for train.py's env:// process group; outside torchrun, one process of its own
    (``$MASTER_PORT`` if set, else a free port). Yields (rank, world size)."""
    saved = {k: os.environ.get(k) for k in _ENV}
    if "LOCAL_RANK" not in os.environ:
        os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    try:
        yield int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _isolated(roots):
    """The working directory, ``sys.path`` and the upstream's modules as they were, afterwards: train.py's
    modules hold the loaded configuration, so they leave with it (one run per configuration)."""
    cwd, path, before = os.getcwd(), list(sys.path), set(sys.modules)
    roots = [str(Path(r).resolve()) for r in roots]
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        config.unload()
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(tuple(roots)):
                del sys.modules[name]


def _check_config(settings: dict, data, out: Path) -> None:
    """What would fail late or mix two runs, from the written config (``config.values``) before it is loaded."""
    if settings[("data", "dataset_source")] == "cifar-10":
        if data is None:
            raise LaunchError("Efficient-VDVAE's CIFAR-10 loader downloads it through tensorflow; vaepatch reads "
                              "CIFAR-10's python batches from a folder instead: pass --data DIR "
                              f"(unpack {cifar_format.CIFAR_SOURCE} there, or for a smoke run: "
                              "vaepatch make-data DIR --for effvdvae)")
        missing = cifar_format.missing(data)
        if missing:
            raise LaunchError(f"no CIFAR-10 under --data {data}: missing {', '.join(missing)}")
    name = settings[("run", "name")]
    checkpoint, archived = out / f"checkpoints-{name}", out / f"logs-{name}" / f"hparams-{name}.cfg"
    if (out / EVENTS).exists() and not checkpoint.exists():
        raise LaunchError(f"{out / EVENTS} already has steps from an earlier attempt and there is no checkpoint "
                          f"({checkpoint}) to continue from: its steps would mix two trajectories. Use a new --out.")
    if archived.exists() and config.values(archived) != settings:
        if not checkpoint.exists():  # hparams would read the archived config and drop the new settings
            raise LaunchError(f"{archived} is the config of an earlier attempt in {out}, and Efficient-VDVAE would "
                              "train with it instead of this run's settings: use a new --out (or remove it)")
        print(f"vaepatch: continuing from {checkpoint}: Efficient-VDVAE resumes with its archived config "
              f"{archived}, not this run's settings", flush=True)


def _same_config(hparams):
    """``hparams.HParams`` for train.py: its ``HParams('.', name="efficient_vdvae")`` gets the configuration
    the launcher loaded from the same file (hparams refuses a second load under one name); the class's other
    uses (``get_hparams_by_name``) are the library's own."""
    import hparams as library

    original = library.HParams

    class HParams(original):
        def __new__(cls, project_path, *args, name="hparams", **kwargs):
            # an instance of the library's class: Python calls no __init__ on it again
            return hparams if name == config.NAME else original(project_path, *args, name=name, **kwargs)

    return Patch(library, "HParams", HParams)


def run_effvdvae(variant: str, out: str | os.PathLike, train_args: list[str], *, upstream_path=None,
                 cpu: bool = False, max_steps: int | None = None, config_name: str | None = None, data=None,
                 fuse: bool | None = None, strict: bool = True, stall_steps: int = STALL_STEPS,
                 stop_when_stalled: bool = False, provenance: bool = True, stop_at_nonfinite: bool = False) -> dict:
    """Run Efficient-VDVAE's train.py with ``variant``; returns the final run.json contents."""
    resolved = resolve_variant(variant)
    check_max_steps(max_steps)
    location = find_clone("effvdvae", upstream_path, strict, "Rayhane-mamah/Efficient-VDVAE")
    require_device(cpu)
    if config.loaded() is not None:
        raise LaunchError("an Efficient-VDVAE configuration is already loaded in this process; run in a fresh one")
    out = Path(out).resolve()
    data = Path(data).resolve() if data is not None else None
    try:
        overrides = config.parse_overrides(train_args)
        base = config.base_config(location, config_name)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    previous = run_manifest.previous(out, resolved.spec)
    libraries = [upstream.locate(n) or upstream.default_dest(n) for n in upstream.pin("effvdvae").needs]
    with _process_env() as (rank, world), _isolated([location, *libraries]):
        if cpu:
            overrides.setdefault(("run", "num_gpus"), str(world))  # on a CPU: the number of processes
        try:
            _check_config(config.values(config.write(base, overrides, out)), data, out)
        except ValueError as e:
            raise LaunchError(str(e)) from None
        upstream.activate("effvdvae", location)
        os.chdir(out)  # train.py reads ./hparams.cfg, writes ./checkpoints-* and ./logs-*
        installed = [shims.install(cpu, data)]
        try:
            hparams = config.load(out)
            model_module = importlib.import_module("model.model")
            installed.append(shims.install_after_import(cpu))
            return _run(resolved, variant, out, train_args, location, hparams, model_module, installed, rank, world,
                        dict(cpu=cpu, max_steps=max_steps, fuse=fuse, strict=strict, stall_steps=stall_steps,
                             stop_when_stalled=stop_when_stalled, provenance=provenance,
                             stop_at_nonfinite=stop_at_nonfinite, base=base, overrides=overrides, data=data,
                             previous=previous))
        finally:
            for shim_set in reversed(installed):
                shim_set.revert()


def _run(resolved, variant, out, train_args, location, hparams, model_module, installed, rank, world, o) -> dict:
    """The run itself, once the configuration is loaded and the upstream imported."""
    sides = tuple(getattr(resolved, side) or upstream_scale(hparams) for side in ("posterior", "prior"))
    manifest_path = out / run_manifest.FILENAME

    def on_stall(since):
        if rank == 0:
            manifest["stalled_since"] = since
            run_manifest.write(manifest_path, manifest)

    recorder = StepRecorder(max_steps=o["max_steps"], scales=sides, kl_module=model_module.kldiv_loss,
                            provenance=o["provenance"], stall_steps=o["stall_steps"],
                            stop_when_stalled=o["stop_when_stalled"], on_stall=on_stall,
                            stop_at_nonfinite=o["stop_at_nonfinite"])
    writer = recorder.open(out / EVENTS, rank, tensorboard=out)
    fuse, fuse_reason = choose_fuse(o["fuse"], o["cpu"], resolved)
    manifest = o["previous"] or run_manifest.new(
        "effvdvae", variant, resolved.spec, upstream_commit=upstream.pin("effvdvae").commit, seed=hparams.run.seed,
        argv=train_args, loss_unit=LOSS_UNIT)
    session = {"started": run_manifest.now(), "argv": list(train_args), "resumed_after_step": writer.resumed_from}
    manifest.update(
        world_size=world, device="cpu" if o["cpu"] else "cuda", fuse=fuse, fuse_reason=fuse_reason,
        max_steps=o["max_steps"], stall_steps=o["stall_steps"], stop_when_stalled=o["stop_when_stalled"],
        stop_at_nonfinite=o["stop_at_nonfinite"], upstream_path=str(location),
        upstream_checkout=upstream.status("effvdvae", location).commit,
        config={"base": str(o["base"]), "overrides": {f"{s}.{k}": v for (s, k), v in o["overrides"].items()},
                "file": str(out / config.FILENAME)},
        data=str(o["data"]) if o["data"] else None, upstream_logdir=str(out / f"logs-{hparams.run.name}"),
        compat=shim_record(runs_shims.Installed([s for i in installed for s in i.shims], [])),  # + load's below
        status="running", ended=None)
    manifest.setdefault("sessions", []).append(session)
    if rank == 0:
        run_manifest.write(manifest_path, manifest)
    handle = hooks = None
    status = "crashed"
    try:
        handle = apply(resolved, target="effvdvae", upstream=location, strict=o["strict"], fuse=fuse)
        train_py = location / "efficient_vdvae_torch" / "train.py"
        loading = shims.install_for_load(o["cpu"])
        try:
            with PatchSet([_same_config(hparams)], label="vaepatch: one Efficient-VDVAE configuration"):
                train, _ = load_script(train_py)  # its module level: config, process group, seeds; guard: main()
        finally:
            loading.revert()
        manifest["compat"] = shim_record(runs_shims.Installed([s for i in [*installed, loading] for s in i.shims], []))
        hooks = PatchSet([Patch(model_module, name, getattr(recorder, name)(getattr(model_module, name)))
                          for name in ("train_step", "compute_loss", "gradient_skip")],
                         label="vaepatch Efficient-VDVAE step recorder").apply()
        status = run_main(train, [str(train_py)])  # train() exit()s after train.total_train_steps: completed
    except BaseException as e:
        status = f"crashed: {type(e).__name__}: {e}"
        raise
    finally:
        if hooks is not None:
            hooks.revert()
        record_end(manifest, session, status, recorder, out, o["stall_steps"], rank)
        if handle is not None:
            handle.revert()
    return manifest


def add_arguments(parser) -> None:
    """``vaepatch run effvdvae``'s own options (its settings go after ``--`` as section.key=value)."""
    parser.add_argument("--data", metavar="DIR", help="effvdvae: the folder holding cifar-10-batches-py (its "
                                                      "CIFAR-10 loader would download it through tensorflow)")
    parser.add_argument("--config", metavar="NAME_OR_PATH",
                        help="effvdvae: the hparams.cfg to start from: a name from the clone's egs/ "
                             "(cifar10_C1), or a path (default: the clone's own, its CIFAR-10 baseline)")


def run_from_args(args, train_args: list) -> dict:
    """``vaepatch run effvdvae`` with the parsed command line."""
    stop = getattr(args, "stop_when_stalled", None)
    return run_effvdvae(args.variant, args.out, train_args, upstream_path=args.upstream, cpu=args.cpu,
                        max_steps=args.max_steps, config_name=args.config, data=args.data, fuse=args.fuse,
                        strict=not args.no_strict, stall_steps=stop or STALL_STEPS, stop_when_stalled=stop is not None,
                        stop_at_nonfinite=getattr(args, "stop_at_nonfinite", False))
