"""`vaepatch bench vdvae-step-time`: training-step time of the real openai/vdvae, patched / vanilla.

A small VDVAE on CPU (width 32, zdim 8, one block per resolution, batch 16, 32x32), the
same weights and batch for every variant, steps interleaved (vanilla, patched, vanilla, ...)
so drift in the machine's speed hits both alike; the ratio is median patched / median vanilla.
:func:`measure` also runs upstream's full ``--hps cifar10`` model on a GPU (``size="cifar10"``,
``device="cuda"``; the GPU check, ``vaepatch bench gpu``), with each step's peak memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from vaepatch.bench.cost import timing
from vaepatch.variant import split_list
from vaepatch.bench.cost.measure import cuda_peak, saved_bytes
from vaepatch.targets.vdvae.tiny import batch, cifar10_vae, tiny_vae

SIZES = {"tiny": tiny_vae, "cifar10": cifar10_vae}


def _sync(x):
    """Wait for the GPU (a CUDA step is only queued when the Python call returns)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _step(model, optimizer, x):
    optimizer.zero_grad(set_to_none=True)
    _sync(x)
    t0 = time.perf_counter()
    stats = model(x, x)
    stats["elbo"].backward()
    optimizer.step()
    _sync(x)
    return time.perf_counter() - t0


def _memory(models, optimizers, x, before) -> dict:
    """Per model, after timing: on CUDA the peak allocated during one step and its rise above what was
    allocated before it (``vaepatch.bench.cost.measure.cuda_peak``); on CPU, which has no allocator
    statistics, the activation bytes autograd saves for backward (``saved_bytes``)."""
    memory = {}
    for name, m in models.items():
        before(name)
        if x.is_cuda:
            memory[name] = cuda_peak(lambda m=m: _step(m, optimizers[name], x), x.device)
        else:
            memory[name] = {"saved_bytes": saved_bytes(lambda m=m: m(x, x)["elbo"], m.parameters())}
    return memory


def measure(variant="upbounded1", steps=30, warmup=5, threads=None, seed=0, fuse=False, device="cpu", size="tiny",
            memory=False):
    """Median step seconds for vanilla and the variant, interleaved, and their ratio (the median of
    per-round ratios, with quartiles). ``fuse``: False, True, or a list of both (then one row each,
    all timed in the same rounds against the same vanilla).

    ``size``: "tiny" (the CPU bench's model) or "cifar10" (upstream's full ``--hps cifar10``, batch 16
    as upstream). ``memory``: also each model's peak memory of one more step (:func:`_memory`).
    """
    import vaepatch

    modes = list(fuse) if isinstance(fuse, (list, tuple)) else [bool(fuse)]
    if threads:
        torch.set_num_threads(threads)
    build = SIZES[size]
    device = torch.device(device)
    names = {mode: "fused" if mode else "eager" for mode in modes}
    vaepatch.revert("vdvae")
    patchsets = {}
    try:
        # apply locates, verifies and imports the clone (or says what to run); built once per mode, toggled per step
        for mode in modes:
            patchsets[names[mode]] = vaepatch.apply(variant, target="vdvae", fuse=mode).patchset
            vaepatch.revert("vdvae")
        with torch.device(device):  # weights drawn where they live (a full model builds in seconds on a GPU)
            # not deepcopy: upstream's z_fn/final_fn lambdas would still point at the first model
            models = {name: build(seed) for name in ["vanilla", *names.values()]}
        H = models["vanilla"][0]
        models = {name: m.to(device) for name, (_, m) in models.items()}
        for m in models.values():
            m.load_state_dict(models["vanilla"].state_dict())  # same weights, same batch
        x = batch(H.n_batch, seed)[0].to(device)
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-6) for name, m in models.items()}
        step_fns = {name: (lambda i, m=m, opt=optimizers[name]: _step(m, opt, x)) for name, m in models.items()}

        switch = timing.switch(patchsets)  # only the named mode's patches applied (none for vanilla)
        times = timing.rounds(step_fns, steps, warmup, desc=f"vanilla vs {variant} ({', '.join(names.values())})",
                              before=switch)
        extra = {"memory": _memory(models, optimizers, x, switch)} if memory else {}
    finally:
        for ps in patchsets.values():
            ps.revert()
        vaepatch.revert("vdvae")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for mode in modes:
        name = names[mode]
        row_extra = ({"memory": {"vanilla": extra["memory"]["vanilla"], "patched": extra["memory"][name]}}
                     if memory else {})
        rows.append(timing.row(variant, {"vanilla": medians["vanilla"], "patched": medians[name]}, steps,
                               ratios=timing.ratio(times, name), fuse=mode, device=str(device), size=size,
                               batch=H.n_batch, **row_extra))
    return rows if isinstance(fuse, (list, tuple)) else rows[0]


def measure_observers(steps=30, warmup=5, threads=None, seed=0):
    """Step time with the launcher's provenance hooks (``provenance.watch``) over without, vanilla
    VDVAE, interleaved on the same weights and batch; the observed step also reads back the loss parts
    as the recorder does. Returns a ``timing.row`` whose "patched" is the observed model."""
    import vaepatch
    from vaepatch import scales
    from vaepatch.targets.vdvae.provenance import watch

    if threads:
        torch.set_num_threads(threads)
    vaepatch.revert("vdvae")
    vaepatch.apply("vanilla", target="vdvae")  # imports the verified clone, patches nothing
    H, model = tiny_vae(seed)
    _, twin = tiny_vae(seed)
    twin.load_state_dict(model.state_dict())
    x, _ = batch(H.n_batch, seed)
    group_watch, handles = watch(twin, scales.get("exp"), scales.get("exp"))
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-6) for m in (model, twin)]

    def observed(i):
        group_watch.reset()
        optimizers[1].zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        stats = twin(x, x)
        stats["elbo"].backward()
        optimizers[1].step()
        torch.stack([stats["elbo"].detach(), stats["rate"].detach(), stats["distortion"].detach()]).tolist()
        return time.perf_counter() - t0

    try:
        med = timing.interleaved({"vanilla": lambda i: _step(model, optimizers[0], x), "patched": observed},
                                 steps, warmup, desc="plain vs provenance hooks")
    finally:
        for handle in handles:
            handle.remove()
    return timing.row("observers", med, steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench vdvae-step-time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="upbounded1,explin,upbounded1-cst1",
                        help="comma-separated variants to time against vanilla")
    parser.add_argument("--steps", type=int, default=30, help="timed rounds (each: one step of every model)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--fuse", choices=["off", "on", "both"], default="both",
                        help="time the eager patch, the torch.compile-fused one, or both (default)")
    parser.add_argument("--observers", action="store_true",
                        help="instead: vanilla with the launcher's provenance hooks over vanilla without")
    args = parser.parse_args(argv)
    if args.observers:
        row = measure_observers(args.steps, args.warmup, args.threads)
        print(timing.table([row], args.steps, args.warmup).replace("vanilla ms", "  plain ms")
              .replace("patched ms", "hooked ms"))
        return 0
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.fuse]
    rows = [row for v in split_list(args.variants)
            for row in measure(v, args.steps, args.warmup, args.threads, fuse=modes)]
    print(timing.table(rows, args.steps, args.warmup, columns=[("fused", 6, lambda r: "yes" if r["fuse"] else "no")]))
    return 0
