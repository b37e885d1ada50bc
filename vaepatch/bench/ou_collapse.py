"""`vaepatch bench ou-collapse`: posterior collapse with and without the OU-smoothed prior.

Pervez & Gavves (ICML 2021), Table 1 / Figure 2, at CPU scale: the 40-40-40-40 MLP hierarchy
(``vaepatch.models.MLPHierarchy``) on dynamically binarized MNIST (9000 train / 1000 validation
images from one file), vanilla against OU smoothing of the priors at a few rho (K copies), a few
seeds each, Adam 1e-3, batch 100, a fixed step budget. Everything is measured on the unsmoothed
model: per-layer KL, validation ELBO and L_k, and active units two ways. The paper's count (the
variance over x of the posterior mean from one stochastic pass, > 0.01) also counts units whose
mean follows the noise of the sampled lower layers without depending on x; the "corrected"
count removes that Monte-Carlo noise (``vaepatch.models.mlp_hierarchy.count_active``).
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

from vaepatch.bench import fill_defaults
from vaepatch.bench.mlp_jobs import ENV, add_training_args, load_data, run_jobs
from vaepatch.models.mlp_hierarchy import ACTIVE_THRESHOLD
from vaepatch.variant import Variant

__all__ = ["summarize", "table_lines", "plot", "main"]

DEFAULTS = dict(steps=10_000, seeds=2, rhos="0.9,0.95", samples=5, n_train=9000, n_val=1000, k=100, passes=20)
# --quick: every table and file, in a few minutes on two shared cores
QUICK = dict(steps=400, seeds=2, n_val=200, k=20, passes=10)



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
    for ax, title, ylabel in zip(axes[0], ("KL per layer (validation)", "active units (wide: paper, hatched: corrected)"),
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


def _parse_rhos(text):
    rhos = [float(v) for v in text.split(",") if v.strip()]
    if any(not 0.0 <= r <= 1.0 for r in rhos):
        raise ValueError(f"every rho must be in [0, 1], got {text!r}")
    return rhos


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench ou-collapse", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"defaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--data", help=f"MNIST .npz with key 'data', or IDX images (default ${ENV})")
    parser.add_argument("--out", default="vaepatch-ou-collapse", help="output folder (json, md, png)")
    parser.add_argument("--quick", action="store_true", help="smoke size; explicit flags still win")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--seeds", type=int, help="seeds per config (seed, seed+1, ...)")
    parser.add_argument("--rhos", help="comma-separated OU rho values (besides vanilla)")
    add_training_args(parser)
    parser.add_argument("--k", type=int, help="importance samples of the L_k bound")
    parser.add_argument("--passes", type=int, help="stochastic passes per image for the corrected active units")
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
    loaded = load_data(args, "vaepatch bench ou-collapse")
    if loaded is None:
        return 2
    path, train_images, val = loaded
    print(f"data: {path}: {len(train_images)} train (binarized afresh every batch) / {len(val)} validation "
          f"(binarized once, seed 0); {args.steps} steps, batch {args.batch}, Adam {args.lr:g}, "
          f"{args.seeds} seed(s), {args.jobs} parallel job(s)", flush=True)

    configs = [("vanilla", None)] + [(f"ou rho={r:g} K={args.samples}", r) for r in rhos]
    common = dict(base=args.base, samples=args.samples, latents=latents, steps=args.steps, batch=args.batch,
                  lr=args.lr, k=args.k, passes=args.passes, threshold=ACTIVE_THRESHOLD,
                  train=train_images, val=val)
    jobs = [dict(common, config=name, rho=rho, seed=args.seed + s) for s in range(args.seeds) for name, rho in configs]
    wall = time.perf_counter()
    runs = run_jobs(jobs, args.jobs, "ou-collapse")
    wall = time.perf_counter() - wall

    rows = summarize(runs, [name for name, _ in configs])
    header = (f"OU smoothing vs posterior collapse (Pervez & Gavves Table 1 / Fig. 2 at CPU scale): MLP "
              f"{'-'.join(map(str, latents))}, {args.steps} steps, mean ± sd over {args.seeds} seed(s); "
              f"validation ELBO and L_{args.k} in nats on {len(val)} images")
    lines = table_lines(rows, len(latents))
    footer = [f"corrected active units: Var_x of the mean over {args.passes} passes minus the mean within-image "
              f"variance / {args.passes} (unbiased for Var_x E[mu | x])",
              f"total wall {wall:.0f} s"]
    print("\n".join(["", header, ""] + lines + [""] + footer))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(data=str(path), n_train=len(train_images), n_val=len(val), latents=latents, steps=args.steps,
                batch=args.batch, lr=args.lr, seeds=args.seeds, seed=args.seed, rhos=rhos, samples=args.samples,
                base=Variant.parse(args.base).spec, k=args.k, passes=args.passes, threshold=ACTIVE_THRESHOLD,
                jobs=args.jobs, wall_seconds=wall, torch=torch.__version__)
    (out / "ou_collapse.json").write_text(json.dumps(dict(meta=meta, summary=rows, runs=runs), indent=1))
    (out / "ou_collapse.md").write_text("\n".join([f"# {header}", "", "```"] + lines + ["```", ""] + footer) + "\n")
    plot(rows, len(latents), out / "ou_collapse.png")
    print(f"wrote {out / 'ou_collapse.json'}, {out / 'ou_collapse.md'}, {out / 'ou_collapse.png'}")
    return 0 if all(r["finite"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
