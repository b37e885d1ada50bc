"""`vaepatch bench overfit`: the paper's overfitting experiment (section 7.1, Table 2) at CPU scale.

The appendix's small conv VAE (latent 100x1x1, Gaussian decoder with one learnable scale) is
trained to overfit 10 natural 32x32 crops on the raw 0..255 scale (batches of 64 drawn from them
with replacement), for every encoder x decoder scale parameterization, a few learning rates and
several seeds; seed s gives every cell the same initial weights and batches. A run fails on a
non-finite loss or gradient (it stops there) or when its final loss diverges (> 1e6). With
``naive_exp`` the encoder's log sigma is taken numerically, as upstream code does, so its
failure shows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

from vaepatch import scales
from vaepatch.bench import paper_tables
from vaepatch.variant import split_list
from vaepatch.models.conv_vae import (BATCH, DECODERS, DIVERGED, ENCODERS, FINAL_STEPS, N_IMAGES, ConvVAE,  # noqa: F401
                                      Result, data, train_one)

__all__ = ["ConvVAE", "data", "train_one", "Result", "run_grid", "table", "plot", "DECODERS", "ENCODERS",
           "DIVERGED", "main"]

LRS = (0.006, 0.007, 0.008)
PAPER_NOTE = f"(paper f/10): Dehaene & Brossard's Table 2 — {paper_tables.TABLE2_PROTOCOL}"


def differences(steps: int, batch: int, seeds: int) -> list[str]:
    """How this grid's protocol differs from the paper's Table 2."""
    return [f"data: {N_IMAGES} natural 32x32 crops (scikit-learn's sample photos), one fixed set; paper: 10 CIFAR-10 "
            "images drawn afresh for each training",
            f"budget: {steps} steps of batch {batch}; paper: 20,000 batches of 512",
            f"runs per cell: {seeds}; paper: 10",
            f"failure: NaN/inf loss or gradient, or a final loss > {DIVERGED:g} nats/image; paper: NaN, or a "
            "negative ELBO orders of magnitude above normal"]


def _job(job: tuple) -> dict:
    encoder, decoder, lr, seed, steps, batch = job
    return asdict(train_one(encoder, decoder, lr, seed, steps, batch=batch))


def run_grid(encoders, decoders, lrs, seeds, steps: int, jobs: int = 2, batch: int = BATCH) -> list[dict]:
    """Every lr x encoder x decoder x seed, ``jobs`` processes at once (one torch thread each)."""
    from tqdm import tqdm

    todo = [(e, d, lr, s, steps, batch) for lr in lrs for s in seeds for e in encoders for d in decoders]
    if jobs <= 1:
        results = [_job(job) for job in tqdm(todo, desc="overfit runs")]
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_job, job) for job in todo]
            results = [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc="overfit runs")]
    order = {job[:4]: i for i, job in enumerate(todo)}
    return sorted(results, key=lambda r: order[(r["encoder"], r["decoder"], r["lr"], r["seed"])])


def grid(results: list[dict]) -> dict:
    """{lr: {encoder: {decoder: (failed runs, runs)}}} in first-seen order."""
    cells: dict = {}
    for r in results:
        cell = cells.setdefault(r["lr"], {}).setdefault(r["encoder"], {}).setdefault(r["decoder"], [0, 0])
        cell[0] += bool(r["failed"])
        cell[1] += 1
    return cells


CORNER = "encoder \\ decoder"


def _cell(lr, encoder, decoder, failed, runs) -> str:
    """Ours 'f/n', and the paper's 'f/10' beside it where the paper has that cell."""
    paper = paper_tables.table2(lr, encoder, decoder)
    return f"{failed}/{runs}" + (f" ({paper})" if paper else "")


def table(results: list[dict], markdown: bool = False) -> str:
    """Failed runs / runs, one block per learning rate: rows encoder scale, columns decoder scale;
    the paper's count in parentheses."""
    lines = []
    for lr, rows in grid(results).items():
        decoders = list(next(iter(rows.values())))
        cells = {e: [_cell(lr, e, d, f, n) for d, (f, n) in cols.items()] for e, cols in rows.items()}
        if markdown:
            lines += [f"**lr {lr:g}** (failed / runs, paper's failed / 10 in parentheses)", "",
                      f"| {CORNER} | " + " | ".join(decoders) + " |", "|---" * (len(decoders) + 1) + "|"]
            lines += [f"| {e} | " + " | ".join(c) + " |" for e, c in cells.items()]
        else:
            lines += [f"lr {lr:g}   failed/runs (paper failed/10)",
                      f"{CORNER:20}" + "".join(f"{d:>14}" for d in decoders)]
            lines += [f"{e:20}" + "".join(f"{v:>14}" for v in c) for e, c in cells.items()]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def failures(results: list[dict]) -> str:
    """Each failed run: why and when, grouped by cell."""
    cells: dict = {}
    for r in results:
        if r["failed"]:
            where = "diverged" if r["reason"] == "diverged" else f"{r['reason']}@{r['step_failed']}"
            cells.setdefault((r["lr"], r["encoder"], r["decoder"]), []).append(f"seed {r['seed']}: {where}")
    return "\n".join(f"lr {lr:g} {e} / {d}: " + ", ".join(v) for (lr, e, d), v in cells.items()) or "no failures"


def converged(results: list[dict]) -> str:
    """The final loss of the runs that did not fail, per cell: the paper saw no difference between them."""
    cells: dict = {}
    for r in results:
        if not r["failed"]:
            cells.setdefault((r["lr"], r["encoder"], r["decoder"]), []).append(r["final_loss"])
    lines = []
    for (lr, e, d), losses in cells.items():
        spread = f" ± {statistics.stdev(losses):.3g}" if len(losses) > 1 else ""
        lines.append(f"lr {lr:g} {e} / {d}: {statistics.fmean(losses):.4g}{spread} ({len(losses)} runs)")
    return "\n".join(lines) or "no run converged"


def plot(results: list[dict], path) -> Path:
    """Heat-map of the failure fraction per cell, one panel per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = grid(results)
    fig, axes = plt.subplots(1, len(cells), figsize=(3 * len(cells) + 2, 3.8), squeeze=False, sharey=True,
                             constrained_layout=True)
    for ax, (lr, rows) in zip(axes[0], cells.items()):
        encoders, decoders = list(rows), list(next(iter(rows.values())))
        fraction = [[rows[e][d][0] / rows[e][d][1] for d in decoders] for e in encoders]
        image = ax.imshow(fraction, cmap="Reds", vmin=0, vmax=1)
        for i, e in enumerate(encoders):
            for j, d in enumerate(decoders):
                f, n = rows[e][d]
                paper = paper_tables.table2(lr, e, d)
                ax.text(j, i, f"{f}/{n}" + (f"\npaper {paper}" if paper else ""), ha="center", va="center",
                        fontsize=8, color="white" if f / n > 0.5 else "black")
        ax.set(xticks=range(len(decoders)), xticklabels=decoders, yticks=range(len(encoders)),
               yticklabels=encoders, xlabel="decoder scale", title=f"lr {lr:g}")
    axes[0][0].set_ylabel("encoder scale")
    fig.colorbar(image, ax=axes[0].tolist(), label="failed fraction")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _names(text: str, known: dict, parser, what: str) -> list[str]:
    names = split_list(text)
    for n in names:
        try:
            scales.get(known.get(n, n))
        except ValueError as e:
            parser.error(f"--{what}: {e}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench overfit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="vaepatch-overfit", help="folder for overfit.json/.md/.png")
    parser.add_argument("--quick", action="store_true", help="smoke size: lr 0.008, 2 seeds, 30 steps")
    parser.add_argument("--seeds", type=int, help="seeds per cell (default 5; --quick 2)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: runs use seeds BASE..BASE+N-1")
    parser.add_argument("--steps", type=int, help="Adam steps per run (default 300; --quick 30)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"images per batch, drawn with replacement "
                                                                   f"(default {BATCH}; the paper: 512)")
    parser.add_argument("--lrs", help="comma-separated (default 0.006,0.007,0.008; --quick 0.008)")
    parser.add_argument("--encoders", default=",".join(ENCODERS), help="q(z|x) scale specs, comma-separated")
    parser.add_argument("--decoders", default=",".join(DECODERS),
                        help=f"p(x|z) scale specs, comma-separated (bounded = {DECODERS['bounded']})")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process and torch thread each")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    steps = args.steps if args.steps is not None else (30 if args.quick else 300)
    lrs = [float(x) for x in (args.lrs or ("0.008" if args.quick else ",".join(map(str, LRS)))).split(",") if x]
    encoders = _names(args.encoders, ENCODERS, parser, "encoders")
    decoders = _names(args.decoders, DECODERS, parser, "decoders")
    if seeds < 1 or steps < 1 or args.batch < 1 or not lrs or not encoders or not decoders:
        parser.error("need at least one seed, step, batch, lr, encoder and decoder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    results = run_grid(encoders, decoders, lrs, range(args.seed, args.seed + seeds), steps, args.jobs, args.batch)
    wall = time.perf_counter() - started
    steps_run = sum(r["steps"] if r["step_failed"] is None else r["step_failed"] + 1 for r in results)
    per_step = sum(r["seconds"] for r in results) / max(steps_run, 1)

    header = (f"Conv VAE overfitting {N_IMAGES} natural 32x32 crops on 0..255 (batch {args.batch} drawn with "
              f"replacement), Adam, {steps} steps, seeds {args.seed}..{args.seed + seeds - 1}; a run fails on a "
              f"NaN/inf loss or gradient, or a final loss > {DIVERGED:g}. bounded = {DECODERS['bounded']}.")
    paper = (PAPER_NOTE + "\nprotocol differences:\n"
             + "\n".join(f"- {d}" for d in differences(steps, args.batch, seeds)))
    text = table(results)
    print(f"\n{header}\n\n{text}\n\n{paper}\n\nfailed runs:\n{failures(results)}\n\n"
          f"final loss (nats/image, mean of the last {FINAL_STEPS} steps) of the runs that did not fail:\n"
          f"{converged(results)}")
    if steps < 300:
        print(f"\nnote: the divergence threshold assumes 300 steps; in {steps}, runs whose decoder scale starts at 1 "
              "on 0..255 (naive_exp, exp: loss ~3e7 at step 0) have not come under it yet")
    print(f"\n{steps_run} steps in {wall:.0f} s wall ({args.jobs} at once): {per_step * 1000:.1f} ms/step per run "
          f"on one torch thread")

    (out / "overfit.md").write_text(f"{header}\n\n{table(results, markdown=True)}\n\n{paper}\n")
    settings = {"steps": steps, "batch": args.batch, "images": N_IMAGES,
                "seeds": list(range(args.seed, args.seed + seeds)),
                "lrs": lrs, "encoders": {e: scales.get(ENCODERS.get(e, e)).spec for e in encoders},
                "decoders": {d: scales.get(DECODERS.get(d, d)).spec for d in decoders},
                "diverged_above": DIVERGED, "wall_seconds": wall, "seconds_per_step": per_step}
    (out / "overfit.json").write_text(json.dumps({"settings": settings, "runs": results}, indent=1, allow_nan=False)
                                      + "\n")
    plot(results, out / "overfit.png")
    print(f"table: {out / 'overfit.md'}, per run: {out / 'overfit.json'}, figure: {out / 'overfit.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
