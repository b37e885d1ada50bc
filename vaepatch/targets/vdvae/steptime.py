"""`vaepatch bench vdvae-step-time`: training-step time of the real openai/vdvae, patched / vanilla.

A small VDVAE on CPU (width 32, zdim 8, one block per resolution, batch 16, 32x32), the
same weights and batch for every variant, steps interleaved (vanilla, patched, vanilla, ...)
so drift in the machine's speed hits both alike; the ratio is median patched / median vanilla.
"""
from __future__ import annotations

import argparse
import time

import torch

from vaepatch.bench import timing
from vaepatch.targets.vdvae.tiny import batch, tiny_vae


def _step(model, optimizer, x):
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    stats = model(x, x)
    stats["elbo"].backward()
    optimizer.step()
    return time.perf_counter() - t0


def measure(variant="upbounded1", steps=30, warmup=5, threads=None, seed=0, fuse=False):
    """Median step seconds for vanilla and the variant, interleaved, and their ratio."""
    import vaepatch

    if threads:
        torch.set_num_threads(threads)
    vaepatch.revert("vdvae")
    # apply locates, verifies and imports the clone (or says what to run); built once, toggled per step
    patchset = vaepatch.apply(variant, target="vdvae", fuse=fuse).patchset
    try:
        patchset.revert()
        H, model = tiny_vae(seed)
        x, _ = batch(H.n_batch, seed)
        _, twin = tiny_vae(seed)  # not deepcopy: upstream's z_fn/final_fn lambdas would still point at `model`
        twin.load_state_dict(model.state_dict())
        models = {"vanilla": model, "patched": twin}  # same weights, same batch
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-6) for name, m in models.items()}
        step_fns = {name: (lambda i, m=m, opt=optimizers[name]: _step(m, opt, x)) for name, m in models.items()}
        med = timing.interleaved(step_fns, steps, warmup, desc=f"vanilla vs {variant}{' (fused)' if fuse else ''}",
                                 before=timing.toggle(patchset))
    finally:
        vaepatch.revert("vdvae")
    return timing.row(variant, med, steps, fuse=fuse)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench vdvae-step-time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="upbounded1,explin,upbounded1-cst1", help="comma-separated variants to time against vanilla")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--fuse", choices=["off", "on", "both"], default="both",
                        help="time the eager patch, the torch.compile-fused one, or both (default)")
    args = parser.parse_args(argv)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.fuse]
    rows = [measure(v.strip(), args.steps, args.warmup, args.threads, fuse=f)
            for v in args.variants.split(",") if v.strip() for f in modes]
    print(timing.table(rows, args.steps, args.warmup, columns=[("fused", 6, lambda r: "yes" if r["fuse"] else "no")]))
    return 0
