"""The `vaepatch` command: one subcommand per job, each a thin front to a module's main()."""
from __future__ import annotations

import sys

USAGE = """usage: vaepatch COMMAND [ARGS]

commands:
  bench numerics   the paper's Table 1: where each KL implementation stops being finite
  bench vdvae-step-time  training-step time of the real openai/vdvae, patched / vanilla (needs a clone)
  bench vdvae-stress  six variants x 3 seeds of the real openai/vdvae on CPU at a breaking lr (needs a clone)
  compare DIR...   NaN steps and skipped updates per variant, from runs' events
  run vdvae        upstream train.py with a variant applied, every step logged (mpiexec -n N for ranks)
  make-data        a small CIFAR-10-format dataset from scikit-learn's bundled photos
  variants         list the built-in variants
  fetch            clone the pinned upstreams (vaepatch fetch vdvae|nvae|all [--source PATH]; --check)

Run `vaepatch COMMAND --help` for a command's options."""


def _variants(argv) -> int:
    from vaepatch import Variant, variants

    if argv:
        print(f"vaepatch variants takes no arguments, got {argv}", file=sys.stderr)
        return 2
    for name, description in variants().items():
        print(f"{name:18} {Variant.parse(name).spec:45} {description}")
    return 0


def _bench(argv) -> int:
    benches = {"numerics": "vaepatch.bench.numerics", "vdvae-step-time": "vaepatch.bench.vdvae_steptime",
               "vdvae-stress": "vaepatch.bench.vdvae_stress"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in benches:
        known = ", ".join(benches)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown bench {argv[0]!r}; available: {known}", file=sys.stderr)
            return 2
        print(f"usage: vaepatch bench NAME [ARGS]; available: {known}")
        return 0
    import importlib

    return importlib.import_module(benches[argv[0]]).main(argv[1:])


def _fetch(argv) -> int:
    from vaepatch.upstream import cli_fetch

    return cli_fetch(argv)


def _run(argv) -> int:
    from vaepatch.launch import main as run_main

    return run_main(argv)


def _compare(argv) -> int:
    from vaepatch.report import main as compare_main

    return compare_main(argv)


def _make_data(argv) -> int:
    from vaepatch.cifar_format import main as make_main

    return make_main(argv)


COMMANDS = {"bench": _bench, "run": _run, "compare": _compare, "make-data": _make_data, "variants": _variants, "fetch": _fetch}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:])
