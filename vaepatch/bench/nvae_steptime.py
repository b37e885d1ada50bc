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
import contextlib
import math
import sys
import time

import torch

from vaepatch.bench import steptime

# NVAE's own argument names (train.py), made small; with the CIFAR-10 flags of its README
# (--use_se --res_dist --num_nf 1 --weight_decay_norm 1e-2).
TINY_ARGS = dict(dataset="cifar10", use_se=True, res_dist=True, num_x_bits=8, num_latent_scales=2,
                 num_groups_per_scale=2, num_latent_per_group=4, ada_groups=False, min_groups_per_scale=1,
                 num_channels_enc=16, num_channels_dec=16, num_preprocess_blocks=1, num_preprocess_cells=1,
                 num_cell_per_cond_enc=1, num_postprocess_blocks=1, num_postprocess_cells=1,
                 num_cell_per_cond_dec=1, num_mixture_dec=10, num_nf=1)
ARCH = "res_mbconv"  # NVAE's default --arch_instance
BATCH = 8
WEIGHT_DECAY_NORM = 1e-2  # NVAE README's CIFAR-10 command
NOMINAL_ITERS = 1000  # kl_coeff(i) as at step i of a run this long (train.py: anneal 30%, const 0.01%)
KL_ANNEAL_PORTION, KL_CONST_PORTION, KL_CONST_COEFF = 0.3, 0.0001, 0.0001  # train.py's defaults
ADAMAX = dict(lr=1e-4, weight_decay=3e-4, eps=1e-3)  # train.py's weight decay and eps
STEPS, WARMUP = 50, 5
QUICK_STEPS, QUICK_WARMUP = 2, 1


@contextlib.contextmanager
def nvae_on_cpu():
    """The NVAE clone first on sys.path and the compat shims this machine needs installed (CPU);
    on exit vaepatch's NVAE patches are reverted and the shims uninstalled. NVAE's modules stay
    imported: one upstream per interpreter."""
    from vaepatch import compat, upstream
    import vaepatch

    path = upstream.locate("nvae")  # an explicit $VAEPATCH_NVAE that is not a directory raises here
    if path is None:
        raise upstream.UpstreamError(
            f"no nvae clone found (looked at ${upstream.pin('nvae').env}, {upstream.default_dest('nvae')}): "
            "nvae-step-time times the real NVlabs/NVAE.\nrun: vaepatch fetch nvae")
    upstream.add_to_path(path)
    shims = compat.install(compat.needed(cpu=True, shims=compat.NVAE_SHIMS))
    try:
        yield path
    finally:
        vaepatch.revert("nvae")
        shims.revert()


def tiny_args(base=None, **overrides):
    """NVAE's parsed-argument namespace: ``base`` (default :data:`TINY_ARGS`) with ``overrides``."""
    base = TINY_ARGS if base is None else base
    unknown = set(overrides) - set(base)
    if unknown:
        raise TypeError(f"unknown NVAE args {sorted(unknown)}")
    return argparse.Namespace(**{**base, **overrides})


def tiny_nvae(seed=0, base=None, **overrides):
    """NVAE's ``model.AutoEncoder`` for :func:`tiny_args`, seeded, in train mode (needs the clone imported)."""
    import model
    import utils

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(None):  # AutoEncoder prints its layer counts
        m = model.AutoEncoder(tiny_args(base, **overrides), None, utils.get_arch_cells(ARCH))
    return m.train()


def cifar_like_batch(n=BATCH, seed=0):
    """NVAE's cifar10 input: 8-bit-valued images in [0, 1], (N, 3, 32, 32), through utils.pre_process."""
    import utils

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255.0
    return utils.pre_process(x, TINY_ARGS["num_x_bits"])


def train_step(model, optimizer, x, alpha_i, global_step):
    """One NVAE training step (train.py's, on CPU in float32): (seconds, loss)."""
    import utils

    optimizer.zero_grad()
    t0 = time.perf_counter()
    logits, log_q, log_p, kl_all, kl_diag = model(x)
    output = model.decoder_output(logits)
    kl_coeff = utils.kl_coeff(global_step, KL_ANNEAL_PORTION * NOMINAL_ITERS, KL_CONST_PORTION * NOMINAL_ITERS,
                              KL_CONST_COEFF)
    recon_loss = utils.reconstruction_loss(output, x, crop=model.crop_output)
    balanced_kl, kl_coeffs, kl_vals = utils.kl_balancer(kl_all, kl_coeff, kl_balance=True, alpha_i=alpha_i)
    loss = torch.mean(recon_loss + balanced_kl)
    norm_loss = model.spectral_norm_parallel()
    bn_loss = model.batchnorm_loss()
    loss = loss + norm_loss * WEIGHT_DECAY_NORM + bn_loss * WEIGHT_DECAY_NORM
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0, loss.item()


def measure(variant="upbounded1", steps=STEPS, warmup=WARMUP, threads=None, seed=0, **overrides):
    """Median step seconds for vanilla and ``variant``, interleaved, and their ratio.

    Also ``losses``: each model's loss at every round (warm-up included). Round i of both models
    starts from the same weights (round 0) and the same batch, and draws the same noise.
    """
    import vaepatch

    if threads:
        torch.set_num_threads(threads)
    with nvae_on_cpu():
        vaepatch.revert("nvae")
        # apply verifies and imports the clone; built once, toggled per step
        patchset = vaepatch.apply(variant, target="nvae", fuse=False).patchset
        patchset.revert()
        import utils

        model = tiny_nvae(seed, **overrides)
        twin = tiny_nvae(seed, **overrides)  # same seed + load_state_dict, not deepcopy
        twin.load_state_dict(model.state_dict())
        models = {"vanilla": model, "patched": twin}
        x = cifar_like_batch(BATCH, seed)
        losses = {name: [] for name in models}

        def step_fn(name, m):
            optimizer = torch.optim.Adamax(m.parameters(), **ADAMAX)
            alpha_i = utils.kl_balancer_coeff(num_scales=m.num_latent_scales, groups_per_scale=m.groups_per_scale,
                                              fun="square")

            def step(i):
                torch.manual_seed(seed * 1_000_003 + i)  # round i: the same noise for both models
                dt, loss = train_step(m, optimizer, x, alpha_i, i)
                losses[name].append(loss)
                return dt

            return step

        med = steptime.interleaved(patchset, {name: step_fn(name, m) for name, m in models.items()},
                                   steps, warmup, desc=f"NVAE vanilla vs {variant}")
    result = steptime.row(variant, med, steps)
    result["losses"] = losses
    return result


def main(argv=None) -> int:
    from vaepatch import Variant
    from vaepatch.upstream import UpstreamError

    parser = argparse.ArgumentParser(prog="vaepatch bench nvae-step-time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="upbounded1,explin,upbounded1-cst1", help="comma-separated variants to time against vanilla")
    parser.add_argument("--steps", type=int, default=None, help=f"timed rounds per variant (default {STEPS}; --quick: {QUICK_STEPS})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed rounds first (default {WARMUP}; --quick: {QUICK_WARMUP})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--num-mixture-dec", type=int, default=TINY_ARGS["num_mixture_dec"],
                        help="NVAE's --num_mixture_dec: 10 (its default) = discretized logistic mixture, "
                             "left alone by the patch; 1 = Normal pixel decoder, patched")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps after {QUICK_WARMUP} warm-up (a smoke test)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else WARMUP)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
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
        rows = [measure(name, steps, warmup, args.threads, num_mixture_dec=args.num_mixture_dec) for name in names]
    except UpstreamError as err:  # no clone, or not the pinned one: says what to run
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(steptime.table(rows, steps, warmup))
    round0 = rows[0]["losses"]["vanilla"][0]
    print(f"NVAE AutoEncoder {ARCH}, cifar10 32x32, batch {BATCH}, num_mixture_dec {args.num_mixture_dec}. "
          f"Loss in round 0 (same weights, batch and noise): vanilla {round0:.6g}; patched - vanilla: "
          + ", ".join(f"{r['variant']} {r['losses']['patched'][0] - r['losses']['vanilla'][0]:+.4g}" for r in rows))
    if any(not math.isfinite(v) for r in rows for ls in r["losses"].values() for v in ls):
        print("warning: a non-finite loss occurred during timing", file=sys.stderr)
    return 0
