"""`vaepatch bench ou-cost`: what OU smoothing of the prior costs per training step, beside its math.

Step time and memory of OU (rho 0.9, K copies) against the plain model, on the MLP hierarchy and,
when their clones are present, on a tiny VDVAE and a tiny NVAE (NVAE's train.py step: KL
balancing, spectral and batch-norm regularisation, Adamax; in a spawned interpreter). Times:
configs interleaved step by step (the order rotated every round) on the same weights and batch,
median of N steps after warm-up, so a change in the machine's load hits every config alike; the
ratio is median / median of plain.

FLOPs. MLP: counted analytically from the layer sizes: a Linear n_in -> n_out on B rows is B n_in
n_out multiply-adds (2 FLOPs each) forward and twice that backward (input and weight gradients;
the first layer, fed by x, needs no input gradient). The smoothed part is the prior nets
p(z_i | z_{i+1}), i < L, run on K x B rows instead of B. Elementwise work (tanh, the KL, Adam) is
left out, so time/FLOP ratios above 1 are overhead beyond the matrix math. The count is checked
against ``torch.utils.flop_counter.FlopCounterMode`` on a real step. VDVAE, NVAE: FlopCounterMode only
(convolutions and matmuls, forward and backward).

Memory, two honest measures (torch has no CPU allocator statistics):
- saved: bytes of the activations autograd keeps for the backward pass (a
  ``saved_tensors_hooks`` pack hook, each storage counted once, parameters excluded) -- the part
  of a step's peak that grows with K; exact and load-independent.
- peak RSS: in a fresh subprocess per config, after one warm-up step, how far the peak resident
  set (Linux VmHWM, reset through /proc/self/clear_refs) rises above the RSS between steps over
  the training steps; includes gradients (freed between steps), temporaries and allocator slack,
  so its ratio is diluted by parts that do not grow with K. Linux only; skipped elsewhere.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from vaepatch.bench import fill_defaults
from vaepatch.bench.cost import timing
from vaepatch.bench.cost.measure import counted_flops, cuda_peak, rss_now_and_peak, saved_bytes
from vaepatch.models.mlp_hierarchy import MLPHierarchy

__all__ = ["mlp_flops", "saved_bytes", "build", "measure_mlp", "measure_upstream", "measure_configs", "main"]

DEFAULTS = dict(steps=50, warmup=10, samples="5,10", rss_steps=20)
QUICK = dict(steps=5, warmup=2, samples="5", rss_steps=3)
RHO = 0.9
PAPER_NOTE = "paper (GPU, full VDVAE-scale model): 4.6 s vs 4.2 s per epoch with OU, x1.095"
VDVAE_DEC = "1x1,4m1,4x2,8m4,16m8,32m16"  # same-resolution and mixin links both present


# -- FLOPs -------------------------------------------------------------------------------------
def mlp_flops(x_dim=784, latents=(40, 40, 40, 40), hidden=200, batch=100, samples=1) -> dict:
    """Analytic matmul FLOPs of one training step (forward + backward) of ``MLPHierarchy``;
    ``samples`` = K OU copies through each prior net (1 = plain)."""
    def macs(n_in, n_out):
        return [n_in * hidden, hidden * hidden, hidden * n_out]

    inputs = (x_dim,) + tuple(latents[:-1])
    encoders = [macs(n, 2 * d) for n, d in zip(inputs, latents)]
    priors = [macs(latents[i + 1], 2 * latents[i]) for i in range(len(latents) - 1)]
    decoder = macs(latents[0], x_dim)
    rest = sum(map(sum, encoders)) + sum(decoder)
    smoothed = sum(map(sum, priors))
    first = encoders[0][0]  # x -> hidden: no gradient for x
    def step(rows_rest, rows_smoothed):
        fwd = rows_rest * rest + rows_smoothed * smoothed
        return 2 * (3 * fwd - rows_rest * first)
    total = step(batch, batch * samples)
    plain = step(batch, batch)
    return dict(total=total, plain=plain, ratio=total / plain,
                smoothed_share_of_plain=2 * 3 * batch * smoothed / plain)


def _rss_worker(kind: str, config, steps: int, threads: int) -> int:
    """In a fresh process: after one warm-up step (optimizer state allocated), reset the peak RSS
    (``echo 5 > /proc/self/clear_refs``) and return how far it rises above the current RSS over ``steps``
    steps, in bytes."""
    torch.set_num_threads(threads)
    with _upstream_on_cpu(kind):
        return _rss_growth_here(kind, config, steps)


def _rss_growth_here(kind, config, steps):
    step, _ = build(kind, config)
    step()
    Path("/proc/self/clear_refs").write_text("5")
    before, _ = rss_now_and_peak()
    for _ in range(steps):
        step()
    return rss_now_and_peak()[1] - before


def rss_growth(kind: str, config, steps: int, threads: int):
    """``_rss_worker`` in a fresh spawned process; None where /proc/self/clear_refs is missing."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_rss_worker, kind, config, steps, threads).result()


# -- the two references --------------------------------------------------------------------------
def _mlp_variant(samples):
    return "vanilla" if samples is None else f"vanilla,ou={RHO}x{samples}"


def build(kind: str, config, seed: int = 0, device="cpu"):
    """(one training step as a callable, extras) for a config of ``kind``, same weights for every config,
    model and batch on ``device``."""
    if kind == "mlp":
        torch.manual_seed(seed)
        model = MLPHierarchy(variant=_mlp_variant(config)).to(device)
        x = torch.bernoulli(torch.full((100, 784), 0.13), generator=torch.Generator().manual_seed(seed)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x)["loss"].backward()
            opt.step()

        return step, dict(model=model, loss=lambda: model(x)["loss"])
    if kind == "vdvae":
        from vaepatch.api import apply
        from vaepatch.targets.vdvae.tiny import batch, tiny_vae

        variant = "upbounded1" if config is None else f"upbounded1,ou={RHO}x{config}"
        handle = apply(variant, target="vdvae")
        H, model = tiny_vae(seed, dec_blocks=VDVAE_DEC)
        model = model.to(device)
        x = batch(H.n_batch, seed)[0].to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x, x)["elbo"].backward()
            opt.step()

        return step, dict(model=model, loss=lambda: model(x, x)["elbo"], patchset=handle.patchset)
    if kind in NVAE_SIZES:
        import utils

        from vaepatch.api import apply
        from vaepatch.targets.nvae import tiny as nv

        variant = "upbounded1" if config is None else f"upbounded1,ou={RHO}x{config}"
        handle = apply(variant, target="nvae")
        _, overrides, batch = NVAE_SIZES[kind]
        model = nv.tiny_nvae(seed, **overrides).to(device)
        x = nv.batch(batch, seed).to(device)
        opt = torch.optim.Adamax(model.parameters(), **nv.ADAMAX)
        alpha_i = utils.kl_balancer_coeff(num_scales=model.num_latent_scales, groups_per_scale=model.groups_per_scale,
                                          fun="square")
        state = {"step": 0}

        def step():
            nv.train_step(model, opt, x, alpha_i, state["step"])  # NVAE's train.py step: KL balancing, spectral norm
            state["step"] += 1

        def loss():
            logits, _, _, kl_all, _ = model(x)
            recon = utils.reconstruction_loss(model.decoder_output(logits), x, crop=model.crop_output)
            return torch.mean(recon + utils.kl_balancer(kl_all, 1.0, kl_balance=True, alpha_i=alpha_i)[0])

        return step, dict(model=model, loss=loss, patchset=handle.patchset)
    raise ValueError(kind)


def _upstream_on_cpu(kind):
    """NVAE's clone on the path with its CPU shims (its module names need their own interpreter)."""
    if kind not in NVAE_SIZES:
        return contextlib.nullcontext()
    from vaepatch.targets.nvae.tiny import nvae_on_cpu

    return nvae_on_cpu()


def _label(samples):
    return "plain" if samples is None else f"ou rho={RHO} K={samples}"


def measure_mlp(samples_list, steps, warmup, rss_steps, threads) -> list:
    configs = [None] + list(samples_list)
    built = {c: build("mlp", c) for c in configs}
    med = timing.interleaved({c: timing.synced(built[c][0], "cpu") for c in configs}, steps, warmup, "ou-cost mlp")
    check = counted_flops(built[configs[-1]][0]), counted_flops(built[None][0])
    rows = []
    for c in configs:
        flops = mlp_flops(samples=1 if c is None else c)
        ex = built[c][1]
        rows.append(dict(reference="mlp 40-40-40-40, batch 100", config=_label(c), samples=c, seconds=med[c],
                         flops=flops["total"], flop_ratio=flops["ratio"],
                         smoothed_share=flops["smoothed_share_of_plain"],
                         saved=saved_bytes(ex["loss"], ex["model"].parameters()),
                         rss=rss_growth("mlp", c, rss_steps, threads) if rss_steps else None))
    rows[0]["flops_counted"], rows[-1]["flops_counted"] = check[1], check[0]
    return _ratios(rows)


# NVAE models: (label, NVAE args over the bench's tiny ones, batch). "nvae-cifar10" is the NVAE README's
# CIFAR-10 command (run_scripts/nvae_cifar.sh): 131M parameters, ~14 s a step on one CPU thread at batch 2.
NVAE_SIZES = {
    "nvae": ("tiny nvae (16 ch, 2x2 groups, batch 8)", {}, 8),
    "nvae-cifar10": ("nvae cifar10 128ch 30 groups batch 2",
                     dict(num_channels_enc=128, num_channels_dec=128, num_preprocess_cells=2, num_postprocess_cells=2,
                          num_latent_scales=1, num_groups_per_scale=30, num_latent_per_group=20,
                          num_cell_per_cond_enc=2, num_cell_per_cond_dec=2), 2),
}
REFERENCES = {"vdvae": "tiny vdvae (width 32, batch 16, 32x32)", **{k: v[0] for k, v in NVAE_SIZES.items()}}


def measure_upstream(kind, samples_list, steps, warmup, rss_steps, threads) -> list:
    """Tiny VDVAE or NVAE, upbounded1 vs upbounded1 + OU; each model keeps its own patch set, toggled
    per step. NVAE runs in a spawned interpreter of its own (its module names clash with VDVAE's)."""
    if kind in NVAE_SIZES:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = pool.submit(_measure_here, kind, samples_list, steps, warmup, threads).result()
    else:
        rows = _measure_here(kind, samples_list, steps, warmup, threads)
    for row in rows:
        row["rss"] = rss_growth(kind, row["samples"], rss_steps, threads) if rss_steps else None
    plain = rows[0]["flops"]
    for row in rows:
        row["flop_ratio"] = row["flops"] / plain
    return _ratios(rows)


def _measure_here(kind, samples_list, steps, warmup, threads) -> list:
    torch.set_num_threads(threads)
    with _upstream_on_cpu(kind):
        return [dict(reference=REFERENCES[kind], config=_label(r["samples"]), samples=r["samples"],
                     seconds=r["seconds"], flops=r["flops"], flops_counted=r["flops"], saved=r["saved"])
                for r in measure_configs(kind, samples_list, steps, warmup)]


def measure_configs(kind, samples_list, steps, warmup, device="cpu") -> list:
    """Plain and OU with each of ``samples_list`` copies, :func:`build` of ``kind`` on ``device``, same weights, each
    config's own patch set applied for its steps only. Per config: ``samples``, the interleaved median step time
    (``seconds``), FlopCounterMode's count (``flops``), and memory: on CUDA the rise of the allocator's peak
    during a step (``peak``), on CPU the bytes autograd saves for backward (``saved``)."""
    from vaepatch.api import revert

    configs = [None] + list(samples_list)
    target = None if kind == "mlp" else "nvae" if kind in NVAE_SIZES else kind
    built, patchsets = {}, {}
    if target:
        revert(target)
    try:
        for c in configs:
            built[c] = build(kind, c, device=device)
            patchsets[c] = built[c][1].get("patchset")
            if patchsets[c] is not None:
                patchsets[c].revert()

        def switch(name):  # only the config's own patch set applied (a no-op revert costs nothing)
            for other in filter(None, patchsets.values()):
                other.revert()
            if patchsets[name] is not None:
                patchsets[name].apply()

        for c in configs[1:]:
            built[c][1]["model"].load_state_dict(built[None][1]["model"].state_dict())
        med = timing.interleaved({c: timing.synced(built[c][0], device) for c in configs}, steps, warmup,
                                 f"ou-cost {kind} on {device}", before=switch)
        rows = []
        for c in configs:
            switch(c)
            step, ex = built[c]
            row = dict(samples=c, seconds=med[c], flops=counted_flops(step))
            if torch.device(device).type == "cuda":
                row["peak"] = cuda_peak(step, torch.device(device))["step_bytes"]
            else:
                row["saved"] = saved_bytes(ex["loss"], ex["model"].parameters())
            rows.append(row)
    finally:
        for patchset in filter(None, patchsets.values()):
            patchset.revert()
        if target:
            revert(target)
    return rows


def _ratios(rows):
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["saved_ratio"] = row["saved"] / base["saved"] if base["saved"] else None
        row["rss_ratio"] = row["rss"] / base["rss"] if row.get("rss") and base.get("rss") else None
        row["time_per_flop_ratio"] = row["time_ratio"] / row["flop_ratio"]
    return rows


def table_lines(rows) -> list:
    lines = [f"{'reference':38} {'config':17} {'ms/step':>8} {'time x':>7} {'FLOP x':>7} {'time/FLOP':>9} "
             f"{'saved MB':>9} {'saved x':>8} {'RSS+ MB':>8} {'RSS x':>6}"]
    for r in rows:
        rss = f"{r['rss'] / 2**20:8.1f}" if r.get("rss") is not None else f"{'-':>8}"
        rss_x = f"{r['rss_ratio']:6.2f}" if r.get("rss_ratio") else f"{'-':>6}"
        lines.append(f"{r['reference']:38} {r['config']:17} {1e3 * r['seconds']:8.2f} {r['time_ratio']:7.3f} "
                     f"{r['flop_ratio']:7.3f} {r['time_per_flop_ratio']:9.3f} {r['saved'] / 2**20:9.2f} "
                     f"{r['saved_ratio']:8.2f} {rss} {rss_x}")
    return lines


UPSTREAMS = {"vdvae": ("tiny VDVAE", "openai/vdvae", f"decoder {VDVAE_DEC}"),
             "nvae": ("NVAE", "NVlabs/NVAE", "res_mbconv cells, --res_dist, 1 flow, 10-logistic pixels")}


def _measure_if_present(kind, mode, samples, args, rows) -> str:
    """Measure ``kind`` into ``rows`` when its clone is found (and ``mode`` is auto); the note for the table."""
    label, repo, what = UPSTREAMS[kind]
    model = {"tiny": "nvae", "cifar10": "nvae-cifar10"}[args.nvae_size] if kind == "nvae" else kind
    if mode == "off":
        return f"{label}: skipped (--{kind} off)"
    from vaepatch.upstream import UpstreamError, locate

    try:
        clone = locate(kind)
    except UpstreamError as err:
        return f"{label}: skipped ({err})"
    if clone is None:
        return f"{label}: skipped (no {repo} clone; run `vaepatch fetch {kind}`)"
    rows += measure_upstream(model, samples, args.steps, args.warmup, args.rss_steps, args.threads)
    return f"{label}: {repo} clone at {clone}, {what}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench ou-cost", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1] + f"\ndefaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--out", default="vaepatch-ou-cost", help="output folder (json, md)")
    parser.add_argument("--quick", action="store_true", help="smoke size; explicit flags still win")
    parser.add_argument("--steps", type=int, help="timed rounds (one step of every config each)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first")
    parser.add_argument("--samples", help="comma-separated K values to compare with plain")
    parser.add_argument("--rss-steps", type=int, help="steps per fresh subprocess for the peak-RSS growth (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--vdvae", choices=["auto", "off"], default="auto",
                        help="also measure a tiny openai/vdvae when a clone is found (auto)")
    parser.add_argument("--nvae", choices=["auto", "off"], default="auto",
                        help="also measure NVlabs/NVAE when a clone is found (auto)")
    parser.add_argument("--nvae-size", choices=["tiny", "cifar10"], default="tiny",
                        help="tiny (default), or cifar10: the NVAE README's CIFAR-10 model at batch 2 "
                             "(~14 s a plain step on one thread: use a few --steps)")
    args = parser.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    try:
        samples = [int(v) for v in str(args.samples).split(",") if v.strip()]
    except ValueError:
        parser.error(f"--samples takes comma-separated integers, got {args.samples!r}")
    if not samples or min(samples) < 1 or args.steps < 1 or args.warmup < 0 or args.rss_steps < 0:
        parser.error("--samples >= 1, --steps >= 1, --warmup >= 0, --rss-steps >= 0")
    torch.set_num_threads(args.threads)

    wall = time.perf_counter()
    rows = measure_mlp(samples, args.steps, args.warmup, args.rss_steps, args.threads)
    upstream_notes = [_measure_if_present(kind, getattr(args, kind), samples, args, rows) for kind in UPSTREAMS]
    wall = time.perf_counter() - wall

    mlp = rows[0]
    check = next(r for r in rows if r["reference"].startswith("mlp") and r is not mlp and "flops_counted" in r)
    header = (f"OU step cost (rho={RHO}), median of {args.steps} interleaved steps after {args.warmup} warm-up, "
              f"{args.threads} thread(s); x = ratio to plain in the same run")
    notes = [f"MLP smoothed part (prior nets z_i | z_(i+1), i < L) = {100 * mlp['smoothed_share']:.1f}% of a plain "
             f"step's matmul FLOPs, so K copies cost 1 + (K - 1) x that share; analytic count vs FlopCounterMode: "
             f"plain {mlp['flops']:,} vs {mlp['flops_counted']:,}, {check['config']} {check['flops']:,} vs "
             f"{check['flops_counted']:,}",
             "time/FLOP > 1: overhead beyond the matrix math (elementwise ops, copies, framework)",
             "saved = activation bytes autograd keeps for backward (parameters excluded); RSS+ = rise of the peak "
             f"RSS above the between-steps RSS over {args.rss_steps} steps (after 1 warm-up step), a fresh subprocess "
             "per config", *upstream_notes, PAPER_NOTE,
             f"total wall {wall:.0f} s"]
    lines = table_lines(rows)
    print("\n".join(["", header, ""] + lines + [""] + notes))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(rho=RHO, samples=samples, steps=args.steps, warmup=args.warmup, rss_steps=args.rss_steps,
                threads=args.threads, wall_seconds=wall, torch=torch.__version__, cpus=os.cpu_count())
    (out / "ou_cost.json").write_text(json.dumps(dict(meta=meta, rows=rows, notes=notes), indent=1))
    (out / "ou_cost.md").write_text("\n".join([f"# {header}", "", "```"] + lines + ["```", ""] + notes) + "\n")
    print(f"wrote {out / 'ou_cost.json'}, {out / 'ou_cost.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
