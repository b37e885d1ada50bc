"""``vaepatch run TARGET``: an upstream's training script with a variant applied, every step logged.

The options every target shares are here; each target adds its own (``launch.add_arguments``) and
runs (``launch.run_from_args``), found through the registry ``vaepatch.targets``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vaepatch import targets, upstream
from vaepatch.runs.events import STALL_STEPS
from vaepatch.runs.manifest import LaunchError
from vaepatch.runs.shims import CompatError

__all__ = ["main", "parser"]


def parser():
    """The ``vaepatch run`` parser and, per target, the destinations of its own options."""
    p = argparse.ArgumentParser(
        prog="vaepatch run",
        description="Run an upstream training script with a variant applied; every step goes to OUT/events.jsonl. "
                    "VDVAE under MPI: mpiexec -n N vaepatch run vdvae ...; NVAE starts its own processes "
                    "(--num_process_per_node N after `--`). VDVAE without its skip rule (an update whose "
                    "gradient norm exceeds --skip_threshold, 400 for cifar10, is skipped): pass "
                    "`-- ... --skip_threshold -1` (a step with a NaN loss is still never applied).")
    p.add_argument("target", choices=list(targets.NAMES), help="which upstream")
    p.add_argument("--variant", required=True, help="built-in name (vaepatch variants), TOML path or inline spec")
    p.add_argument("--out", required=True, help="run directory: run.json and events.jsonl go here")
    p.add_argument("--upstream", help="path of the clone (default: $VAEPATCH_<TARGET>, then third_party/<target>)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (gloo, no .cuda()); for smoke tests")
    p.add_argument("--max-steps", type=int, help="stop cleanly after this global step count")
    p.add_argument("--stop-when-stalled", nargs="?", type=int, const=STALL_STEPS, metavar="N",
                   help=f"stop cleanly once N steps in a row (default {STALL_STEPS}) had no update (skipped or "
                        "non-finite): the run is dead. Without it a stall is still detected and marked in run.json")
    p.add_argument("--stop-at-nonfinite", action="store_true",
                   help="stop cleanly after the first step whose loss was non-finite "
                        "(for sweeps: a failed run costs little)")
    p.add_argument("--no-strict", action="store_true", help="patch a clone that differs from the pin (warns)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the patched per-group math (default: yes on a GPU where torch.compile works, "
                        "no on CPU; run.json says which ran)")
    own = {}
    for name in targets.NAMES:
        group = p.add_argument_group(f"{name} only")
        targets.part(name, "launch").add_arguments(group)
        own[name] = [(action.dest, action.option_strings[0]) for action in group._group_actions]
    usage = [f"vaepatch run {name} --variant V --out DIR [--upstream PATH] [--cpu] [--max-steps N] "
             "[--stop-when-stalled [N]] "
             + "".join(f"[{flag}] " for _, flag in own[name]) + "-- <train.py args>" for name in targets.NAMES]
    p.usage = "\n       ".join(usage)
    return p, own


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_args = argv[:split], argv[split + 1:]
    p, own = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        p.error(f"unrecognized arguments {' '.join(extra)}: arguments for train.py go after `--`")
    if args.stop_when_stalled is not None and args.stop_when_stalled < 1:
        p.error(f"--stop-when-stalled takes a number of steps >= 1, got {args.stop_when_stalled}")
    for name, options in own.items():
        for dest, flag in options:
            if name != args.target and getattr(args, dest) not in (None, False) and dest not in dict(own[args.target]):
                p.error(f"{flag} is for `vaepatch run {name}`"
                        + (" (VDVAE already skips non-finite losses itself)" if dest == "skip_nonfinite" else ""))
    try:
        manifest = targets.part(args.target, "launch").run_from_args(args, train_args)
    except (LaunchError, upstream.UpstreamError, CompatError) as e:
        print(f"vaepatch run: {e}", file=sys.stderr)
        return 2
    print(f"vaepatch run: {manifest['status']}; events in {Path(args.out) / 'events.jsonl'}", flush=True)
    return 0
