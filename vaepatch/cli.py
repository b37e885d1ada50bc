"""The `vaepatch` command: one subcommand per job, each a thin front to a module's main()."""
from __future__ import annotations

import sys

USAGE = """usage: vaepatch COMMAND [ARGS]

commands:
  demo             the stability reproduction in minutes on a CPU: 4 encoder scales x 5 seeds, table + figure
  bench numerics   the paper's Table 1: where each KL implementation stops being finite
  bench vdvae-step-time  training-step time of the real openai/vdvae, patched / vanilla (needs a clone)
  bench nvae-step-time  training-step time of the real NVlabs/NVAE on CPU, patched / vanilla (needs a clone)
  bench vdvae-stress  every built-in variant x 3 seeds of the real openai/vdvae on CPU at a breaking lr (needs a clone)
  bench stability-margin  learning-rate headroom per variant on the real VDVAE or NVAE (tiny, CPU; needs a clone)
  bench skip-counts  the paper's Table 4 at CPU scale: NaN steps, skipped updates, stalls over long VDVAE runs
  bench overfit    Dehaene & Brossard Table 2 at CPU scale: conv VAE, encoder x decoder scales x LRs
  bench decoder-variance  their Table 3 at CPU scale: MNIST MLP VAE, decoded scale parameterizations
  bench ou-collapse  Pervez & Gavves Table 1 at CPU scale: MLP hierarchy, vanilla vs OU-smoothed prior
  bench phase      their Figure 1: top-layer KL against rho, with the critical rho
  bench ou-cost    step time and memory of OU smoothing (K = 5, 10) vs plain, beside the FLOP ratio
  bench activation-memory  bytes held for backward per variant, patched / vanilla, eager and fused (needs clones)
  bench gpu        the GPU check: VDVAE/NVAE step time, AMP skips, the launchers' CUDA path, OU cost (--dry-run: CPU)
  compare DIR...   NaN steps and skipped updates per variant, from runs' events
  run vdvae        upstream train.py with a variant applied, every step logged (mpiexec -n N for ranks)
  run nvae         NVAE's train.py with a variant in every process it starts, every step logged (AMP skips too)
  make-data        a small CIFAR-10-format dataset from scikit-learn's bundled photos
  variants         list the built-in variants
  fetch            clone the pinned upstreams (vaepatch fetch vdvae|nvae|all [--source PATH]; --check)

Run `vaepatch COMMAND --help` for a command's options."""


def _variants(argv) -> int:
    from vaepatch import Variant, variants

    if argv and argv[0] in ("-h", "--help"):
        print("usage: vaepatch variants\n\nThe built-in variants: name, the scales it resolves to (posterior, prior, "
              "decoder), and what it is. Any of them, a TOML file or an inline spec such as "
              "'posterior=explin,prior=cst1' goes to vaepatch.apply and --variant.")
        return 0
    if argv:
        print(f"vaepatch variants takes no arguments, got {argv}", file=sys.stderr)
        return 2
    for name, description in variants().items():
        print(f"{name:18} {Variant.parse(name).spec:45} {description}")
    return 0


def _bench(argv) -> int:
    from vaepatch import targets

    benches = {"numerics": "vaepatch.bench.reparam.numerics", **targets.benches(),
               "overfit": "vaepatch.bench.reparam.overfit",
               "decoder-variance": "vaepatch.bench.reparam.decoder_variance",
               "ou-collapse": "vaepatch.bench.ou.collapse", "phase": "vaepatch.bench.ou.phase",
               "ou-cost": "vaepatch.bench.cost.ou_smoothing",
               "activation-memory": "vaepatch.bench.cost.activation_memory",
               "stability-margin": "vaepatch.bench.margin", "skip-counts": "vaepatch.bench.skip_counts",
               "gpu": "vaepatch.bench.gpu"}
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
    from vaepatch.fetch_command import main as fetch_main

    return fetch_main(argv)


def _run(argv) -> int:
    from vaepatch.run_command import main as run_main

    return run_main(argv)


def _compare(argv) -> int:
    from vaepatch.compare import main as compare_main

    return compare_main(argv)


def _demo(argv) -> int:
    from vaepatch.demo import main as demo_main

    return demo_main(argv)


def _make_data(argv) -> int:
    from vaepatch.cifar_format import main as make_main

    return make_main(argv)


COMMANDS = {"bench": _bench, "demo": _demo, "run": _run, "compare": _compare, "make-data": _make_data,
            "variants": _variants, "fetch": _fetch}


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
