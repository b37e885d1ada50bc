"""`vaepatch bench nvae-step-time`: training-step time of the real NVlabs/NVAE, patched / vanilla.

A small NVAE ``model.AutoEncoder`` on CPU, built by NVAE's own code with its own cells
(``utils.get_arch_cells("res_mbconv")``, NVAE's default): cifar10 32x32, 2 latent scales x 2
groups of 4 latents, 16 channels, one cell per block, with the CIFAR-10 flags of NVAE's README
(squeeze-excitation, residual posterior, one flow, spectral regularisation 1e-2) and NVAE's
default pixel decoder, a mixture of 10 discretized logistics (``--num_mixture_dec 10``, which
the patch leaves alone; ``--num-mixture-dec 1`` gives the Normal pixel decoder, which it
patches); batch 8. The same weights, batch and noise for every variant, steps interleaved
(vanilla, patched, vanilla, ...) so drift in the machine's speed hits both alike; the ratio is
median patched / median vanilla.

One step is what NVAE's ``train.py`` does per step, by NVAE's own functions: ``model(x)``,
``model.decoder_output``, ``utils.reconstruction_loss``, ``utils.kl_balancer`` (with
``utils.kl_coeff`` as at step i of a nominal 1000-step run with train.py's default anneal
portions, so the balancing path runs), ``model.spectral_norm_parallel`` and
``model.batchnorm_loss`` times 1e-2, backward and ``torch.optim.Adamax`` (train.py's eps and
weight decay; lr 1e-4, as early in its warm-up). Not timed: zero_grad, and what train.py does
on a GPU only (autocast and its grad scaler, gradient all-reduce).

NVAE's top-level modules (``utils``, ``model``, ...) clash with openai/vdvae's: run this in its
own interpreter (``vaepatch bench nvae-step-time`` does).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from vaepatch.bench.cost import timing
from vaepatch.variant import split_list
from vaepatch.targets.nvae.tiny import ADAMAX, ARCH, BATCH, TINY_ARGS, batch, nvae_on_cpu, tiny_nvae, train_step

STEPS, WARMUP = 50, 5
QUICK_STEPS, QUICK_WARMUP = 2, 1

def measure(variant="upbounded1", steps=STEPS, warmup=WARMUP, threads=None, seed=0, observers=False, fuse=False,
            **overrides):
    """Median step seconds for vanilla and ``variant``, interleaved, and their ratio (the median of
    per-round ratios, with quartiles). ``fuse``: False, True, or a list of both (then one row each, all
    timed in the same rounds against the same vanilla).

    Also ``losses`` per row: each model's loss at every round (warm-up included). Round i of every model
    starts from the same weights (round 0) and the same batch, and draws the same noise.
    ``observers=True``: the "patched" model instead carries the launcher's provenance hooks
    (``provenance.watch``; use with variant "vanilla" to time the hooks alone).
    """
    import vaepatch

    modes = list(fuse) if isinstance(fuse, (list, tuple)) else [bool(fuse)]
    names = {mode: "fused" if mode else "eager" for mode in modes}
    if threads:
        torch.set_num_threads(threads)
    with nvae_on_cpu():
        vaepatch.revert("nvae")
        patchsets = {}  # apply verifies and imports the clone; built once per mode, switched per step
        for mode in modes:
            patchsets[names[mode]] = vaepatch.apply(variant, target="nvae", fuse=mode).patchset
            vaepatch.revert("nvae")
        import utils

        models = {"vanilla": tiny_nvae(seed, **overrides)}
        for name in names.values():  # same seed + load_state_dict, not deepcopy
            models[name] = tiny_nvae(seed, **overrides)
            models[name].load_state_dict(models["vanilla"].state_dict())
        if observers:
            from vaepatch.targets.nvae.patch import UPSTREAM_SCALE
            from vaepatch.targets.nvae.provenance import watch

            observed = models[names[modes[0]]]
            group_watch, _ = watch(observed, UPSTREAM_SCALE, UPSTREAM_SCALE,
                                   on_kl=lambda kl_all: sum(kl.detach().float().mean() for kl in kl_all))
        x = batch(BATCH, seed)
        losses = {name: [] for name in models}

        def step_fn(name, m):
            optimizer = torch.optim.Adamax(m.parameters(), **ADAMAX)
            alpha_i = utils.kl_balancer_coeff(num_scales=m.num_latent_scales, groups_per_scale=m.groups_per_scale,
                                              fun="square")

            def step(i):
                torch.manual_seed(seed * 1_000_003 + i)  # round i: the same noise for every model
                if observers and m is observed:
                    group_watch.reset()
                dt, loss = train_step(m, optimizer, x, alpha_i, i)
                losses[name].append(loss)
                return dt

            return step

        try:
            times = timing.rounds({name: step_fn(name, m) for name, m in models.items()}, steps, warmup,
                                  desc=f"NVAE vanilla vs {variant} ({', '.join(names.values())})",
                                  before=timing.switch(patchsets))
        finally:
            for patchset in patchsets.values():
                patchset.revert()
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for mode in modes:
        name = names[mode]
        row = timing.row(variant, {"vanilla": medians["vanilla"], "patched": medians[name]}, steps,
                         ratios=timing.ratio(times, name), fuse=mode)
        row["losses"] = {"vanilla": losses["vanilla"], "patched": losses[name]}
        rows.append(row)
    return rows if isinstance(fuse, (list, tuple)) else rows[0]


def main(argv=None) -> int:
    from vaepatch import Variant
    from vaepatch.upstream import UpstreamError

    parser = argparse.ArgumentParser(prog="vaepatch bench nvae-step-time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="upbounded1,explin,upbounded1-cst1",
                        help="comma-separated variants to time against vanilla")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed rounds per variant (default {STEPS}; --quick: {QUICK_STEPS})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed rounds first (default {WARMUP}; --quick: {QUICK_WARMUP})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--num-mixture-dec", type=int, default=TINY_ARGS["num_mixture_dec"],
                        help="NVAE's --num_mixture_dec: 10 (its default) = discretized logistic mixture, "
                             "left alone by the patch; 1 = Normal pixel decoder, patched")
    parser.add_argument("--fuse", choices=["off", "on", "both"], default="both",
                        help="time the eager patch, the torch.compile-fused one, or both (default)")
    parser.add_argument("--observers", action="store_true",
                        help="instead: vanilla with the launcher's provenance hooks over vanilla without")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps after {QUICK_WARMUP} warm-up (a smoke test)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else WARMUP)
    names = split_list(args.variants)
    prog = "vaepatch bench nvae-step-time"
    if not names or steps < 1 or warmup < 0:
        parser.error("need at least one variant, --steps >= 1 and --warmup >= 0")
    try:
        for name in names:
            Variant.parse(name)  # an unknown name says what is wrong and what is accepted, before anything is built
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    try:
        if args.observers:
            names = ["vanilla"]
        modes = [False] if args.observers else {"off": [False], "on": [True], "both": [False, True]}[args.fuse]
        rows = [row for name in names for row in measure(name, steps, warmup, args.threads, observers=args.observers,
                                                          fuse=modes, num_mixture_dec=args.num_mixture_dec)]
    except UpstreamError as err:  # no clone, or not the pinned one: says what to run
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(timing.table(rows, steps, warmup, columns=[("fused", 6, lambda r: "yes" if r["fuse"] else "no")]))
    round0 = rows[0]["losses"]["vanilla"][0]
    print(f"NVAE AutoEncoder {ARCH}, cifar10 32x32, batch {BATCH}, num_mixture_dec {args.num_mixture_dec}. "
          f"Loss in round 0 (same weights, batch and noise): vanilla {round0:.6g}; patched - vanilla: "
          + ", ".join(f"{r['variant']} {r['losses']['patched'][0] - r['losses']['vanilla'][0]:+.4g}" for r in rows))
    if any(not math.isfinite(v) for r in rows for ls in r["losses"].values() for v in ls):
        print("warning: a non-finite loss occurred during timing", file=sys.stderr)
    return 0
