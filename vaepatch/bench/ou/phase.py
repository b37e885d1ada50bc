"""`vaepatch bench phase`: the top layer's KL against the OU correlation rho (Pervez & Gavves, Figure 1).

Every rho of the grid is its own training run of the MLP hierarchy (same data, steps and seeds as
``ou-collapse``, smaller defaults); the top-layer KL is measured on the unsmoothed model on the
validation images. rho = 1 is the plain model. The paper sees a phase transition: below a
critical rho the top layer carries information, above it the layer collapses.

Critical rho: the plateau is the mean top-layer KL at the lowest rho of the grid; the critical rho
is the first rho (scanning upwards) where the mean falls below half of that plateau, linearly
interpolated between the two grid points around the crossing. None when the mean never falls that
low on the grid, or when the plateau itself is below ``--floor`` nats (nothing to lose).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vaepatch.bench import fill_defaults
from vaepatch.bench.ou.jobs import ENV, add_training_args, load_data, run_jobs
from vaepatch.mnist import MNIST_SOURCE
from vaepatch.variant import Variant

__all__ = ["critical_rho", "main"]

DEFAULTS = dict(rhos="0.8,0.85,0.88,0.9,0.92,0.95,1.0", seeds=2, steps=2000, samples=5, n_train=9000, n_val=1000, k=10)
QUICK = dict(rhos="0.8,0.9,1.0", seeds=2, steps=200, n_val=200, k=5)


def critical_rho(rhos, top_kl, floor: float = 0.5):
    """(critical rho or None, plateau): see the module docstring. ``top_kl`` holds the means per rho."""
    order = np.argsort(rhos)
    r, kl = np.asarray(rhos, float)[order], np.asarray(top_kl, float)[order]
    plateau = float(kl[0])
    if not np.isfinite(plateau) or plateau < floor:
        return None, plateau
    half = plateau / 2
    for i in range(1, len(r)):
        if kl[i] < half:
            t = (kl[i - 1] - half) / (kl[i - 1] - kl[i])
            return float(r[i - 1] + t * (r[i] - r[i - 1])), plateau
    return None, plateau


def plot(rows, critical, plateau, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    r = np.array([row["rho"] for row in rows])
    mean = np.array([row["top_kl_mean"] for row in rows])
    lo = np.array([row["top_kl_min"] for row in rows])
    hi = np.array([row["top_kl_max"] for row in rows])
    ax.fill_between(r, lo, hi, alpha=0.25, label="min..max over seeds")
    ax.plot(r, mean, "o-", label="mean over seeds")
    for row in rows:
        ax.plot([row["rho"]] * len(row["top_kl"]), row["top_kl"], "k.", ms=3)
    ax.axhline(plateau / 2, color="gray", ls=":", lw=1, label="half the low-rho plateau")
    if critical is not None:
        ax.axvline(critical, color="C3", ls="--", label=f"critical rho ~ {critical:.3f}")
    ax.set_xlabel("OU rho (1 = no smoothing)")
    ax.set_ylabel("top-layer KL (nats, unsmoothed model)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench phase", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1] + f"\ndefaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--data", help=f"MNIST images: an .npz with key 'data', or the IDX file from {MNIST_SOURCE} "
                                       f"(default ${ENV}; never downloaded)")
    parser.add_argument("--out", default="vaepatch-ou-phase", help="output folder (json, png)")
    parser.add_argument("--quick", action="store_true", help="smoke size; explicit flags still win")
    parser.add_argument("--rhos", help="comma-separated grid of rho (1 = plain model)")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--steps", type=int, help="training steps per run (the same at every rho)")
    add_training_args(parser)
    parser.add_argument("--k", type=int, help="passes averaged for the validation KL")
    parser.add_argument("--floor", type=float, default=0.5, help="smallest plateau (nats) with a critical rho")
    args = parser.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)
    try:
        rhos = sorted({float(v) for v in args.rhos.split(",") if v.strip()})
        latents = tuple(int(v) for v in args.latents.split(","))
        Variant.parse(args.base)
    except ValueError as err:
        parser.error(str(err))
    if len(rhos) < 2 or not all(0.0 <= r <= 1.0 for r in rhos):
        parser.error(f"--rhos needs at least two values in [0, 1], got {args.rhos!r}")
    if min(args.steps, args.seeds, args.samples, args.batch, args.k, args.n_train, args.n_val) < 1:
        parser.error("--steps, --seeds, --samples, --batch, --k, --n-train, --n-val must be >= 1")
    loaded = load_data(args, "vaepatch bench phase")
    if loaded is None:
        return 2
    path, train_images, val = loaded
    print(f"data: {path}: {len(train_images)} train / {len(val)} validation; {len(rhos)} rho x {args.seeds} "
          f"seed(s), {args.steps} steps each, K = {args.samples}, {args.jobs} parallel job(s)", flush=True)

    common = dict(base=args.base, samples=args.samples, latents=latents, steps=args.steps, batch=args.batch,
                  lr=args.lr, k=args.k, passes=0, threshold=0.0, warmup=args.warmup, init=args.init,
                  train=train_images, val=val)
    # rho = 1 is run through the same code path (smoothed_prior returns the plain prior exactly)
    jobs = [dict(common, config=f"rho={r:g}", rho=r, seed=args.seed + s) for s in range(args.seeds) for r in rhos]
    wall = time.perf_counter()
    runs = run_jobs(jobs, args.jobs, "phase")
    wall = time.perf_counter() - wall

    rows = []
    for r in rhos:
        mine = [run for run in runs if run["rho"] == r and run["finite"]]
        kls = [run["top_kl"] for run in mine]
        rows.append(dict(rho=r, top_kl=kls, top_kl_mean=float(np.mean(kls)) if kls else float("nan"),
                         top_kl_min=float(min(kls, default=float("nan"))),
                         top_kl_max=float(max(kls, default=float("nan"))),
                         kl_per_layer_mean=np.mean([run["kl_per_layer"] for run in mine], 0).tolist() if mine else [],
                         elbo_mean=float(np.mean([run["elbo"] for run in mine])) if mine else float("nan"),
                         runs=sum(run["rho"] == r for run in runs)))
    critical, plateau = critical_rho([row["rho"] for row in rows], [row["top_kl_mean"] for row in rows], args.floor)
    title = (f"top-layer KL vs rho: MLP {'-'.join(map(str, latents))}, {args.steps} steps, K={args.samples}, "
             f"{args.seeds} seed(s)")
    layers = "/".join(f"z{i + 1}" for i in range(len(latents)))
    lines = [title, "", f"{'rho':>6} {'top KL mean':>12} {'min':>9} {'max':>9} {'val ELBO':>9}  "
                        f"{'mean KL ' + layers:28}  top KL per seed"]
    for row in rows:
        lines.append(f"{row['rho']:6.3f} {row['top_kl_mean']:12.3g} {row['top_kl_min']:9.3g} {row['top_kl_max']:9.3g} "
                     f"{row['elbo_mean']:9.2f}  {'/'.join(f'{v:.2f}' for v in row['kl_per_layer_mean']):28}  "
                     + ", ".join(f"{v:.3g}" for v in row["top_kl"]))
    crit_text = (f"{critical:.3f}" if critical is not None else
                 ("none: the low-rho plateau is below the floor" if plateau < args.floor else "none within the grid"))
    lines += ["", f"low-rho plateau (mean top KL at rho = {rhos[0]:g}): {plateau:.3g} nats; "
                  f"critical rho (mean first below half of it, linear interpolation): {crit_text}",
              f"total wall {wall:.0f} s"]
    print("\n" + "\n".join(lines))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(data=str(path), n_train=len(train_images), n_val=len(val), latents=latents, steps=args.steps,
                batch=args.batch, lr=args.lr, seeds=args.seeds, seed=args.seed, samples=args.samples,
                base=Variant.parse(args.base).spec, k=args.k, floor=args.floor, warmup=args.warmup, init=args.init,
                wall_seconds=wall,
                critical_rule="mean top KL first below half of its value at the lowest rho, linear interpolation")
    (out / "ou_phase.json").write_text(json.dumps(dict(meta=meta, critical_rho=critical, plateau=plateau, rows=rows,
                                                       runs=runs), indent=1))
    plot(rows, critical, plateau, out / "ou_phase.png", title)
    print(f"wrote {out / 'ou_phase.json'}, {out / 'ou_phase.png'}")
    return 0 if all(run["finite"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
