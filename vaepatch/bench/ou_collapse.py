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
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vaepatch.bench import fill_defaults
from vaepatch.mnist import MNIST_SOURCE, load_mnist
from vaepatch.models.mlp_hierarchy import ACTIVE_THRESHOLD, MLPHierarchy, binarize, train
from vaepatch.variant import OU, Variant

__all__ = ["resolve_data", "load_images", "split", "run_one", "run_jobs", "summarize", "main"]

ENV = "VAEPATCH_MNIST"
DEFAULT_DATA = "/work/shared/data/mnist_test10k.npz"
DEFAULTS = dict(steps=10_000, seeds=2, rhos="0.9,0.95", samples=5, n_train=9000, n_val=1000, k=100, passes=20)
# --quick: every table and file, in a few minutes on two shared cores
QUICK = dict(steps=400, seeds=2, n_val=200, k=20, passes=10)
# Scoping (one seed, 5k steps), for orientation only; every printed number comes from this run.
SCOPING_NOTE = ("scoping, for orientation (1 seed, 5k steps): top-layer KL vanilla 0.08 vs OU rho=0.9 13.1 nats, "
                "ELBO -164.6 vs -145.9; paper-style top-layer AU 0 vs 35, corrected 0 vs 0; rho=0.95 collapsed")


def resolve_data(path=None) -> Path:
    """--data, else $VAEPATCH_MNIST, else the shared copy if present; never downloads."""
    path = path or os.environ.get(ENV) or (DEFAULT_DATA if Path(DEFAULT_DATA).is_file() else None)
    if not path:
        raise FileNotFoundError(f"no MNIST file: pass --data PATH or set ${ENV} to an .npz whose key 'data' holds "
                                f"(N, 28, 28) uint8 images (canonical source {MNIST_SOURCE}); nothing is downloaded")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file {str(path)!r} does not exist (an .npz with key 'data', (N, 28, 28) uint8; "
                                f"canonical source {MNIST_SOURCE}); nothing is downloaded")
    return path


def load_images(path) -> np.ndarray:
    """The images of an MNIST file (.npz with key 'data', or IDX) as (N, 784) uint8."""
    try:
        data = load_mnist(path)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    return data.reshape(len(data), -1)


def load_data(args, prog: str):
    """(path, train images, fixed validation set) for --data/--n-train/--n-val, or None after
    printing why (a missing or unreadable file)."""
    try:
        path = resolve_data(args.data)
        train_images, val_images = split(load_images(path), args.n_train, args.n_val)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None
    return path, train_images, validation_set(val_images)


def split(images: np.ndarray, n_train: int, n_val: int):
    """(train, validation): disjoint, from a seed-0 permutation, the same for every run."""
    if n_train + n_val > len(images):
        raise ValueError(f"need {n_train} + {n_val} images, the file has {len(images)}")
    order = np.random.default_rng(0).permutation(len(images))
    return images[order[:n_train]], images[order[n_train:n_train + n_val]]


def validation_set(images: np.ndarray) -> torch.Tensor:
    """One fixed binarization (seed 0) of the validation images, shared by every run."""
    return binarize(images, torch.Generator().manual_seed(0))


def config_variant(base: str, rho: float | None, samples: int) -> Variant:
    variant = Variant.parse(base)
    return replace(variant, ou=None if rho is None else OU(float(rho), int(samples)))


def run_one(job: dict, progress_queue=None) -> dict:
    """Train one model and measure it (unsmoothed): the per-run numbers that go to the JSON."""
    torch.set_num_threads(job.get("threads", 1))
    torch.manual_seed(job["seed"])
    variant = config_variant(job["base"], job["rho"], job["samples"])
    model = MLPHierarchy(x_dim=job["train"].shape[1], latents=job["latents"], variant=variant)
    progress = (lambda n: progress_queue.put(n)) if progress_queue is not None else job.get("progress")
    start = time.perf_counter()
    history = train(model, job["train"], job["steps"], batch=job["batch"], lr=job["lr"], seed=job["seed"],
                    progress=progress)
    train_seconds = time.perf_counter() - start
    out = dict(config=job["config"], rho=job["rho"], samples=job["samples"] if job["rho"] is not None else None,
               seed=job["seed"], variant=variant.spec, steps_done=history[-1][0] if history else 0,
               train_seconds=train_seconds, history=history,
               finite=bool(history) and math.isfinite(history[-1][1]))
    if not out["finite"]:
        return out
    model.eval()
    torch.manual_seed(10_000 + job["seed"])
    val = job["val"]
    ev = model.evaluate(val, k=job["k"])
    out.update(elbo=ev["elbo"], iw_bound=ev["iw_bound"], k=ev["k"], kl_per_layer=ev["kl_per_layer"],
               top_kl=ev["kl_per_layer"][-1], recon=ev["recon"])
    if job.get("passes"):
        au = model.active_units(val, passes=job["passes"], threshold=job["threshold"])
        out.update(active_paper=au["paper"], active_corrected=au["corrected"], passes=au["passes"],
                   paper_variance=[v.tolist() for v in au["paper_variance"]],
                   corrected_variance=[v.tolist() for v in au["corrected_variance"]])
    out["eval_seconds"] = time.perf_counter() - start - train_seconds
    return out


def run_jobs(jobs: list, processes: int, desc: str) -> list:
    """Run ``run_one`` on every job (in ``processes`` spawned workers, 1 torch thread each), with one
    tqdm bar over all training steps. Results come back in the jobs' order."""
    from tqdm import tqdm

    results = [None] * len(jobs)
    with tqdm(total=sum(j["steps"] for j in jobs), desc=desc, unit="step", file=sys.stderr, smoothing=0.05) as bar:
        if processes <= 1:
            for i, job in enumerate(jobs):
                results[i] = run_one({**job, "progress": bar.update})
            return results
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from queue import Empty

        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(processes, mp_context=ctx) as pool:
            queue = manager.Queue()
            futures = {pool.submit(run_one, job, queue): i for i, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                try:
                    while True:
                        bar.update(queue.get_nowait())
                except Empty:
                    pass
                for f in done:
                    results[futures[f]] = f.result()
    return results


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


def add_training_args(parser) -> None:
    """The MLP-hierarchy training flags ou-collapse and phase share (seed, K, scales, size, optimiser, data, jobs)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, help="K, OU copies per prior")
    parser.add_argument("--base", default="vanilla", help="variant for the scales (default: exp on both sides)")
    parser.add_argument("--latents", default="40,40,40,40")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-val", type=int)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (1 thread each)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench ou-collapse", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"defaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--data", help=f"MNIST .npz with key 'data' (default ${ENV}, else {DEFAULT_DATA})")
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
              f"variance / {args.passes} (unbiased for Var_x E[mu | x])", SCOPING_NOTE,
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
