"""`vaepatch bench ou-collapse`: posterior collapse with and without the OU-smoothed prior.

Pervez & Gavves (ICML 2021), Table 1 / Figure 2, at CPU scale: the 40-40-40-40 MLP hierarchy
(``vaepatch.models.MLPHierarchy``) on dynamically binarized MNIST (9000 train / 1000 validation
images from one file), vanilla against OU smoothing of the priors at a few rho (K copies), a few
seeds each, Adam 1e-3, batch 100, a fixed step budget. Everything is measured on the unsmoothed
model: per-layer KL, validation ELBO and L_k, and active units two ways. The paper's count (the
variance over x of the posterior mean from one stochastic pass, > 0.01) also counts units whose
mean follows the noise of the sampled lower layers without depending on x; the "corrected"
count removes that Monte-Carlo noise (``vaepatch.models.mlp_hierarchy.count_active``).

Long runs: every --eval-every steps each run measures its per-layer KL, ELBO and active units
(printed and plotted along training), and every --checkpoint-every steps it saves a checkpoint
under ``--out/checkpoints``; ``--resume`` continues every run from its checkpoint (a stopped run
gives the numbers it would have given uninterrupted) and can raise ``--steps`` of finished runs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vaepatch.bench import fill_defaults, paper_tables
from vaepatch.bench.ou.jobs import ENV, add_training_args, load_data, run_jobs
from vaepatch.mnist import MNIST_SOURCE
from vaepatch.models.mlp_hierarchy import ACTIVE_THRESHOLD
from vaepatch.models.mlp_training import CheckpointMismatch
from vaepatch.variant import Variant

__all__ = ["summarize", "table_lines", "plot", "main"]

DEFAULTS = dict(steps=10_000, seeds=2, rhos="0.9,0.95", samples=5, n_train=9000, n_val=1000, k=100, passes=20,
                eval_every=2000, checkpoint_every=5000)
# --quick: every table and file, in a few minutes on two shared cores
QUICK = dict(steps=400, seeds=2, n_val=200, k=20, passes=10, eval_every=200, checkpoint_every=200)
EVAL_K, EVAL_PASSES = 1, 5  # the measurements along training: one-pass ELBO, active units from 5 passes



def _stats(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list, configs: list) -> list:
    """Per config: mean and sd over its finite seeds of every reported number."""
    rows = []
    for name in configs:
        mine = [r for r in runs if r["config"] == name]
        ok = [r for r in mine if r["finite"]]
        row = dict(config=name, runs=len(mine), finite=len(ok), variant=mine[0]["variant"] if mine else "")
        for key in ("top_kl", "elbo", "iw_bound"):
            row[key] = _stats([r[key] for r in ok])
        for key in ("kl_per_layer", "active_paper", "active_corrected"):
            if ok and key in ok[0]:
                row[key] = [_stats([r[key][i] for r in ok]) for i in range(len(ok[0][key]))]
        steps = sum(r["steps_done"] for r in mine)
        row["ms_per_step"] = 1e3 * sum(r["train_seconds"] for r in mine) / max(1, steps)
        rows.append(row)
    return rows


def _pm(stat, digits=2):
    mean, sd = stat
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _pm_kl(stat):
    """A KL with 3 significant digits: a collapsed layer's 0.0003 nats should not print as 0.00."""
    mean, sd = stat
    return f"{mean:.3g} ± {sd:.2g}"


def table_lines(rows: list, layers: int) -> list:
    names = [f"z{i + 1}" for i in range(layers)]
    w = max(10, max(len(r["config"]) for r in rows))
    lines = [f"{'config':{w}} {'runs':>5} {'top-layer KL':>18} {'val ELBO':>18} {'val L_k':>18} {'ms/step':>8}"]
    for r in rows:
        lines.append(f"{r['config']:{w}} {r['finite']:>2}/{r['runs']:<2} {_pm_kl(r['top_kl']):>18} "
                     f"{_pm(r['elbo']):>18} {_pm(r['iw_bound']):>18} {r['ms_per_step']:8.1f}")
    lines += ["", "KL per layer (nats, validation, unsmoothed model; z1 bottom .. top)",
              f"{'config':{w}} " + " ".join(f"{n:>18}" for n in names)]
    for r in rows:
        if "kl_per_layer" in r:
            lines.append(f"{r['config']:{w}} " + " ".join(f"{_pm_kl(s):>18}" for s in r["kl_per_layer"]))
    if any("active_paper" in r for r in rows):
        lines += ["", f"Active units per layer (Var_x > {ACTIVE_THRESHOLD}); paper = one stochastic pass, "
                      "corrected = Monte-Carlo noise removed",
                  f"{'config':{w}} {'metric':10} " + " ".join(f"{n:>13}" for n in names)]
        for r in rows:
            for key, label in (("active_paper", "paper"), ("active_corrected", "corrected")):
                if key in r:
                    lines.append(f"{r['config']:{w}} {label:10} " + " ".join(f"{_pm(s, 1):>13}" for s in r[key]))
    return lines


def paper_lines(rows: list, steps: int, n_train: int) -> list:
    """Our rows beside the paper's Table 1 (40-40-40-40 models), with what differs."""
    lines = [f"{'model':28} {'steps':>6} {'val ELBO':>9} {'val L_k':>9} {'KL':>6} {'top KL':>7}  "
             "active units z1-z2-z3-z4"]
    for r in rows:
        if "kl_per_layer" not in r:
            continue
        au = "-".join(f"{m:.0f}" for m, _ in r.get("active_paper", []))
        lines.append(f"{'ours ' + r['config']:28} {steps:>6} {r['elbo'][0]:9.1f} {r['iw_bound'][0]:9.1f} "
                     f"{sum(m for m, _ in r['kl_per_layer']):6.1f} {r['top_kl'][0]:7.3g}  {au}")
    for name, (elbo, kl, top, au) in paper_tables.TABLE1_40x4.items():
        lines.append(f"{'paper ' + name:28} {'1M':>6} {'':>9} {elbo:9.1f} {kl:6.1f} {top:7.3g}  "
                     f"{'-'.join(map(str, au))}")
    lines += [f"paper: Pervez & Gavves Table 1 ({paper_tables.TABLE1_PROTOCOL}); ours: {n_train} MNIST test-file "
              f"images, {steps} steps, validation ELBO and L_k on held-out images of the same file"]
    return lines


def along_lines(runs: list, layers: int) -> list:
    """Per run, the measurements taken along training (validation, unsmoothed model)."""
    names = "/".join(f"z{i + 1}" for i in range(layers))
    lines = [f"{'config':18} {'seed':>4} {'step':>7} {'val ELBO':>9}  {'KL ' + names:30} active units {names}"]
    for r in runs:
        for e in r.get("evals", []):
            au = "/".join(str(v) for v in e.get("active_paper", []))
            kl = "/".join(f"{v:.2f}" for v in e["kl_per_layer"])
            lines.append(f"{r['config']:18} {r['seed']:>4} {e['step']:>7} {e['elbo']:9.1f}  {kl:30} {au}")
    return lines


def plot_along(runs: list, layers: int, path: Path) -> None:
    """KL and active units of every layer against training steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, layers, figsize=(3.2 * layers, 5.5), squeeze=False, sharex=True, sharey="row")
    configs = list(dict.fromkeys(r["config"] for r in runs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r in runs:
        evals = r.get("evals", [])
        if not evals:
            continue
        c = colors[configs.index(r["config"]) % len(colors)]
        steps = [e["step"] for e in evals]
        for i in range(layers):
            label = r["config"] if r["seed"] == min(q["seed"] for q in runs) else None
            axes[0, i].plot(steps, [e["kl_per_layer"][i] for e in evals], color=c, label=label)
            if "active_paper" in evals[0]:
                axes[1, i].plot(steps, [e["active_paper"][i] for e in evals], color=c)
    for i in range(layers):
        axes[0, i].set_title(f"z{i + 1}")
        axes[1, i].set_xlabel("training step")
    axes[0, 0].set_yscale("symlog", linthresh=0.1)  # shared by the row: 0.01 nats and 15 nats both readable
    axes[0, 0].set_ylim(bottom=0)
    axes[1, 0].set_ylim(bottom=0)
    axes[0, 0].set_ylabel("KL (nats, validation)")
    axes[1, 0].set_ylabel("active units")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot(rows: list, layers: int, path: Path) -> None:
    """Per-layer KL and active units (paper's and corrected) per config, mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_au = any("active_paper" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_au else 1, figsize=(11 if has_au else 6, 4), squeeze=False)
    x = np.arange(layers)
    width = 0.8 / max(1, len(rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, r in enumerate(rows):
        if "kl_per_layer" not in r:
            continue
        c = colors[j % len(colors)]
        mean, sd = np.array(r["kl_per_layer"]).T
        axes[0, 0].bar(x + j * width, mean, width, yerr=sd, color=c, label=r["config"], capsize=2)
        if has_au and "active_paper" in r:
            pm, ps = np.array(r["active_paper"]).T
            cm, cs = np.array(r["active_corrected"]).T
            axes[0, 1].bar(x + j * width, pm, width, yerr=ps, color=c, alpha=0.35, capsize=2,
                           label=f"{r['config']} paper")
            axes[0, 1].bar(x + j * width, cm, width * 0.5, yerr=cs, color=c, hatch="//", edgecolor="k", capsize=2,
                           label=f"{r['config']} corrected")
    labels = [f"z{i + 1}" for i in range(layers)]
    for ax, title, ylabel in zip(axes[0],
                                 ("KL per layer (validation)", "active units (wide: paper, hatched: corrected)"),
                                 ("nats", "units")):
        ax.set_xticks(x + 0.4 - width / 2, labels)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    axes[0, 0].set_yscale("symlog", linthresh=0.1)  # a collapsed 0.05 nats and a used 10 nats, both visible
    for ax in axes[0]:
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slug(config: str) -> str:
    return config.replace(" ", "-").replace("=", "")


def _parse_rhos(text):
    rhos = [float(v) for v in text.split(",") if v.strip()]
    if any(not 0.0 <= r <= 1.0 for r in rhos):
        raise ValueError(f"every rho must be in [0, 1], got {text!r}")
    return rhos


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench ou-collapse", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"defaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--data", help=f"MNIST images: an .npz with key 'data', or the IDX file from {MNIST_SOURCE} "
                                       f"(default ${ENV}; never downloaded)")
    parser.add_argument("--out", default="vaepatch-ou-collapse", help="output folder (json, md, png)")
    parser.add_argument("--quick", action="store_true", help="smoke size; explicit flags still win")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--seeds", type=int, help="seeds per config (seed, seed+1, ...)")
    parser.add_argument("--rhos", help="comma-separated OU rho values (besides vanilla)")
    add_training_args(parser)
    parser.add_argument("--k", type=int, help="importance samples of the L_k bound")
    parser.add_argument("--passes", type=int, help="stochastic passes per image for the corrected active units")
    parser.add_argument("--eval-every", type=int, help="measure KL, ELBO and active units every N steps")
    parser.add_argument("--checkpoint-every", type=int,
                        help="save each run's checkpoint every N steps (and at its end)")
    parser.add_argument("--resume", action="store_true", help="continue the runs checkpointed under --out")
    args = parser.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    try:
        rhos = _parse_rhos(args.rhos)
        latents = tuple(int(v) for v in args.latents.split(","))
        Variant.parse(args.base)
    except ValueError as err:
        parser.error(str(err))
    if min(args.steps, args.seeds, args.samples, args.batch, args.k, args.n_train, args.n_val) < 1 or args.passes < 2:
        parser.error("--steps, --seeds, --samples, --batch, --k, --n-train, --n-val must be >= 1, --passes >= 2")
    if min(args.eval_every, args.checkpoint_every, args.warmup) < 0:
        parser.error("--eval-every, --checkpoint-every and --warmup must be >= 0")
    out = Path(args.out)
    saved = sorted((out / "checkpoints").glob("*.pt"))
    if saved and not args.resume:
        print(f"vaepatch bench ou-collapse: {out / 'checkpoints'} holds {len(saved)} checkpoint(s) of an earlier run: "
              "pass --resume to continue them (same flags; --steps may grow), or choose another --out", file=sys.stderr)
        return 2
    loaded = load_data(args, "vaepatch bench ou-collapse")
    if loaded is None:
        return 2
    path, train_images, val = loaded
    print(f"data: {path}: {len(train_images)} train (binarized afresh every batch) / {len(val)} validation "
          f"(binarized once, seed 0); {args.steps} steps, batch {args.batch}, Adam {args.lr:g}, "
          f"{args.seeds} seed(s), KL warm-up {args.warmup} steps, init {args.init}, {args.jobs} parallel job(s)"
          + (f"; resuming {len(saved)} checkpoint(s)" if saved else ""), flush=True)

    configs = [("vanilla", None)] + [(f"ou rho={r:g} K={args.samples}", r) for r in rhos]
    common = dict(base=args.base, samples=args.samples, latents=latents, steps=args.steps, batch=args.batch,
                  lr=args.lr, k=args.k, passes=args.passes, threshold=ACTIVE_THRESHOLD, warmup=args.warmup,
                  init=args.init, eval_every=args.eval_every, eval_k=EVAL_K, eval_passes=EVAL_PASSES,
                  checkpoint_every=args.checkpoint_every, train=train_images, val=val)
    jobs = [dict(common, config=name, rho=rho, seed=args.seed + s,
                 checkpoint=str(out / "checkpoints" / f"{_slug(name)}-seed{args.seed + s}.pt"))
            for s in range(args.seeds) for name, rho in configs]
    wall = time.perf_counter()
    try:
        runs = run_jobs(jobs, args.jobs, "ou-collapse")
    except CheckpointMismatch as err:
        print(f"vaepatch bench ou-collapse: {err}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - wall

    rows = summarize(runs, [name for name, _ in configs])
    header = (f"OU smoothing vs posterior collapse (Pervez & Gavves Table 1 / Fig. 2 at CPU scale): MLP "
              f"{'-'.join(map(str, latents))}, {args.steps} steps, mean ± sd over {args.seeds} seed(s); "
              f"validation ELBO and L_{args.k} in nats on {len(val)} images")
    lines = table_lines(rows, len(latents))
    lines += ["", "Beside the paper's Table 1 (their L_100; ours L_k, active units the paper's way, mean over seeds)"]
    lines += paper_lines(rows, args.steps, len(train_images))
    if any(r.get("evals") for r in runs):
        lines += ["", f"Along training (validation, unsmoothed model; ELBO from {EVAL_K} pass, active units the "
                      f"paper's way)"] + along_lines(runs, len(latents))
    footer = [f"corrected active units: Var_x of the mean over {args.passes} passes minus the mean within-image "
              f"variance / {args.passes} (unbiased for Var_x E[mu | x])",
              f"total wall {wall:.0f} s"]
    print("\n".join(["", header, ""] + lines + [""] + footer))

    out.mkdir(parents=True, exist_ok=True)
    meta = dict(data=str(path), n_train=len(train_images), n_val=len(val), latents=latents, steps=args.steps,
                batch=args.batch, lr=args.lr, seeds=args.seeds, seed=args.seed, rhos=rhos, samples=args.samples,
                base=Variant.parse(args.base).spec, k=args.k, passes=args.passes, threshold=ACTIVE_THRESHOLD,
                warmup=args.warmup, init=args.init, eval_every=args.eval_every, resumed=bool(saved),
                jobs=args.jobs, wall_seconds=wall, torch=torch.__version__)
    (out / "ou_collapse.json").write_text(json.dumps(dict(meta=meta, summary=rows, runs=runs), indent=1))
    (out / "ou_collapse.md").write_text("\n".join([f"# {header}", "", "```"] + lines + ["```", ""] + footer) + "\n")
    plot(rows, len(latents), out / "ou_collapse.png")
    plot_along(runs, len(latents), out / "ou_collapse_training.png")
    print(f"wrote {out / 'ou_collapse.json'}, {out / 'ou_collapse.md'}, {out / 'ou_collapse.png'}, "
          f"{out / 'ou_collapse_training.png'}")
    return 0 if all(r["finite"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
