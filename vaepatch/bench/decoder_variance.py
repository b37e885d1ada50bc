"""`vaepatch bench decoder-variance`: the paper's section 7.2 / Table 3 at CPU scale.

Learning the decoder's variance: a one-latent-layer VAE on MNIST whose decoder outputs,
per pixel, a mean mu and the raw parameter p of a Normal's scale sigma.  The question
is which parameterization of sigma trains without NaN, and at what test likelihood.

Model: encoder 784-128-ReLU-256 -> (mean, raw scale) of a 128-d q(z|x), scale
``upbounded1``; decoder 128-128-ReLU-1568 -> (mu, p) per pixel; mu is sigmoid(.) or the
identity; sigma comes from ``scales.get(spec)(p)``.  ``naive_exp`` takes log sigma as
log(exp(p)) numerically and feeds it to the same log-prob/KL code, so its failure shows.
Loss: -log N(x | mu, sigma) summed over pixels + KL(q || N(0, 1)), batch mean; Adam.

Data: the images of one MNIST file (.npz with key ``data``, N x 28 x 28 uint8, or the
canonical IDX file).  A permutation with the fixed seed 0 (independent of --seed) puts
the last 10% of the images in a held-out test set (9000 / 1000 for the 10k test file).
Pixels k in 0..255 become x = (k + u) / 256 with u ~ U(0, 1): uniform dequantization,
fresh noise every training step, one fixed draw for the test set.

NLL: the negative ELBO (one z sample, fixed noise) per test image, for the density on
the 0..1 scale, converted to the 0..255 discrete scale:

    bits/dim = nelbo_per_image / (784 ln 2) + log2(256)

(each 8-bit bin has width 1/256, so -log2 P(k) <= -log2 p(x) + 8 by Jensen; a uniform
density on [0, 1] gives exactly 8 bits/dim).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vaepatch import gaussian, scales
from vaepatch.bench import fill_defaults
from vaepatch.mnist import ENV, load_mnist
from vaepatch.mnist import resolve as resolve_data

ALPHA = "1/(256*sqrt(12))"  # the 8-bit quantization noise std on the 0..1 scale
SCALES = ["naive_exp", "exp", "upbounded1", f"downbounded({ALPHA})", f"bounded({ALPHA}, 1)"]
MUS = ["sigmoid", "identity"]
LRS = [1e-4, 1e-3]
PIXELS = 28 * 28
LATENT = 128
PAPER_NOTE = "paper's Table 3: see arXiv 2106.13739 (its numbers could not be retrieved here, so none are printed)"


# ---------------------------------------------------------------- data

def split(images: np.ndarray, test_fraction: float = 0.1):
    """(train, test): a seed-0 permutation, last 10% held out, the same for every run."""
    order = np.random.default_rng(0).permutation(len(images))
    n_test = max(1, int(round(len(images) * test_fraction)))
    return images[order[:-n_test]], images[order[-n_test:]]


def _levels(images) -> torch.Tensor:
    """Pixel levels k in 0..255 as float32, one image per row."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).reshape(len(images), -1).float()


def dequantize(levels: torch.Tensor, generator=None) -> torch.Tensor:
    """x = (k + u) / 256, u ~ U(0, 1): a density on [0, 1] with 8-bit bins of width 1/256."""
    return (levels + torch.rand(levels.shape, generator=generator)) / 256.0


def bits_per_dim(nelbo_per_image: float, dims: int = PIXELS) -> float:
    """Negative ELBO (nats, density on the 0..1 scale) -> bits/dim on the 0..255 scale."""
    return nelbo_per_image / (dims * math.log(2.0)) + 8.0


# ---------------------------------------------------------------- model

class VAE(nn.Module):
    """The shallow VAE of the paper's section 7.2, decoded scale given by a vaepatch spec."""

    def __init__(self, mu: str = "sigmoid", scale: str = "bounded"):
        super().__init__()
        if mu not in MUS:
            raise ValueError(f"mu must be one of {MUS}, got {mu!r}")
        self.mu, self.scale = mu, scales.get(scale)
        self.q_scale = scales.get("upbounded1")
        self.encoder = nn.Sequential(nn.Linear(PIXELS, 128), nn.ReLU(), nn.Linear(128, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, 128), nn.ReLU(), nn.Linear(128, 2 * PIXELS))

    def nelbo(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """-log N(x | mu, sigma) over pixels + KL(q || N(0, 1)), one z sample, per image."""
        z_loc, z_raw = self.encoder(x).chunk(2, dim=1)
        z_scale, z_log_scale = self.q_scale(z_raw)
        z = gaussian.rsample(z_loc, z_scale, eps)
        loc, raw = self.decoder(z).chunk(2, dim=1)
        if self.mu == "sigmoid":
            loc = torch.sigmoid(loc)
        _, log_scale = self.scale(raw)
        zero = torch.zeros((), dtype=x.dtype)
        kl = gaussian.kl(z_loc, z_log_scale, zero, zero).sum(1)
        return -gaussian.log_prob(x, loc, log_scale).sum(1) + kl


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class RunConfig:
    mu: str
    scale: str
    lr: float
    seed: int
    epochs: int
    batch_size: int = 128


def evaluate(model: VAE, test_levels: torch.Tensor, seed: int = 0, chunk: int = 500) -> float:
    """Mean test negative ELBO per image (nats), with dequantization and z noise fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(test_levels), chunk):
            x = dequantize(test_levels[i:i + chunk], g)
            eps = torch.randn(len(x), LATENT, generator=g)
            total += float(model.nelbo(x, eps).double().sum())
    return total / len(test_levels)


def train_run(config: RunConfig, train_levels: torch.Tensor, test_levels: torch.Tensor,
              model: VAE | None = None, on_epoch=None) -> dict:
    """Train one model; stop at the first non-finite loss and record its epoch and step.

    ``model`` lets a caller start from a prepared model (the tests force a failing one);
    it must match ``config``.  ``on_epoch(n)`` is called after every epoch trained.
    """
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    if model is None:
        model = VAE(config.mu, config.scale)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    result = {**asdict(config), "scale": model.scale.spec, "failed": False, "fail_epoch": None,
              "fail_step": None, "fail_value": None, "epochs_trained": 0, "train_bpd": [],
              "test_nelbo": None, "test_bpd": None, "train_seconds": 0.0}
    n, step = len(train_levels), 0
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        total = 0.0
        for idx in torch.randperm(n).split(config.batch_size):
            step += 1
            loss = model.nelbo(dequantize(train_levels[idx])).mean()
            if not torch.isfinite(loss):
                result.update(failed=True, fail_epoch=epoch, fail_step=step, fail_value=str(float(loss.detach())))
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if result["failed"]:
            break
        result["epochs_trained"] = epoch
        result["train_bpd"].append(bits_per_dim(total / n))
        if on_epoch:
            on_epoch(epoch)
    result["train_seconds"] = time.perf_counter() - start
    if not result["failed"]:
        nelbo = evaluate(model, test_levels)
        result["test_nelbo"] = nelbo if math.isfinite(nelbo) else str(nelbo)
        result["test_bpd"] = bits_per_dim(nelbo) if math.isfinite(nelbo) else None
    return result


# ---------------------------------------------------------------- report

def summarize(runs: list[dict]) -> list[dict]:
    """One row per (mu, scale, lr): failures / seeds, failure epochs, test bits/dim of finite runs."""
    cells = {}
    for r in runs:
        cells.setdefault((r["mu"], r["scale"], r["lr"]), []).append(r)
    rows = []
    for (mu, scale, lr), rs in cells.items():
        epochs = [r["fail_epoch"] for r in rs if r["failed"]]
        bpd = [r["test_bpd"] for r in rs if r["test_bpd"] is not None]
        rows.append({"mu": mu, "scale": scale, "lr": lr, "seeds": len(rs), "failed": len(epochs),
                     "fail_epoch_min": min(epochs) if epochs else None,
                     "fail_epoch_max": max(epochs) if epochs else None,
                     "test_nonfinite": sum(1 for r in rs if not r["failed"] and r["test_bpd"] is None),
                     "finite": len(bpd), "test_bpd_mean": statistics.fmean(bpd) if bpd else None,
                     "test_bpd_std": statistics.stdev(bpd) if len(bpd) > 1 else None})
    return rows


def _cell_text(row):
    fails = f"{row['failed']}/{row['seeds']}"
    if row["failed"]:
        lo, hi = row["fail_epoch_min"], row["fail_epoch_max"]
        epochs = str(lo) if lo == hi else f"{lo}-{hi}"
    else:
        epochs = "-"
    if row["test_bpd_mean"] is None:
        bpd = "-"
    else:
        bpd = f"{row['test_bpd_mean']:.3f}"
        if row["test_bpd_std"] is not None:
            bpd += f" ± {row['test_bpd_std']:.3f}"
        bpd += f" (n={row['finite']})"
    if row["test_nonfinite"]:
        bpd += f", {row['test_nonfinite']} non-finite at test"
    return fails, epochs, bpd


def label(spec: str) -> str:
    """A scale spec with the pixel bound written as alpha, for tables and plots."""
    return spec.replace(repr(scales.PIXEL_ALPHA), "α")


def row_line(row: dict) -> str:
    fails, epochs, bpd = _cell_text(row)
    return f"| {row['mu']} | {label(row['scale'])} | {row['lr']:g} | {fails} | {epochs} | {bpd} |"


def table_lines(rows: list[dict]) -> list[str]:
    """A markdown table, the same text on stdout and in decoder_variance.md."""
    return (["| mu | decoded scale | lr | NaN/inf runs | first NaN/inf epoch | test bits/dim (finite runs) |",
             "|---|---|---|---|---|---|"] + [row_line(row) for row in rows]
            + ["", f"α = 1/(256·√12) = {scales.PIXEL_ALPHA:.6g}; NaN/inf: training loss non-finite "
               "(run stopped there); bits/dim: mean ± std over seeds of the test negative ELBO"])


def plot(rows: list[dict], path: Path):
    """Two heat-maps, scale x (mu, lr): fraction of runs that failed, and mean test bits/dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale_names = list(dict.fromkeys(r["scale"] for r in rows))
    cols = list(dict.fromkeys((r["mu"], r["lr"]) for r in rows))
    frac = np.full((len(scale_names), len(cols)), np.nan)
    bpd = np.full_like(frac, np.nan)
    for r in rows:
        i, j = scale_names.index(r["scale"]), cols.index((r["mu"], r["lr"]))
        frac[i, j] = r["failed"] / r["seeds"]
        if r["test_bpd_mean"] is not None:
            bpd[i, j] = r["test_bpd_mean"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 3.2 * len(cols), 1.2 + 0.6 * len(scale_names)), squeeze=False)
    for ax, data, title, fmt, cmap in ((axes[0, 0], frac, "NaN/inf runs (fraction)", "{:.2f}", "Reds"),
                                       (axes[0, 1], bpd, "test bits/dim (finite runs)", "{:.3f}", "viridis")):
        im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=0 if data is frac else None, vmax=1 if data is frac else None)
        ax.set_xticks(range(len(cols)), [f"{m}\nlr={lr:g}" for m, lr in cols], fontsize=8)
        ax.set_yticks(range(len(scale_names)), [label(s) for s in scale_names], fontsize=8)
        ax.set_title(title, fontsize=9)
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, "-" if np.isnan(v) else fmt.format(v), ha="center", va="center", fontsize=8,
                    bbox=dict(facecolor="white", alpha=0.7, linewidth=0))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- CLI

QUICK = {"mu": "sigmoid", "scales": f"naive_exp;bounded({ALPHA}, 1)", "lrs": "1e-3", "seeds": 1, "epochs": 2}
DEFAULTS = {"mu": ",".join(MUS), "scales": ";".join(SCALES), "lrs": ",".join(f"{lr:g}" for lr in LRS),
            "seeds": 3, "epochs": 15}


def _split_specs(text):
    """Scale specs split on ';', or on ',' outside parentheses (bounded(a, b) has a comma)."""
    if ";" in text:
        return [s.strip() for s in text.split(";") if s.strip()]
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [s.strip() for s in out + [cur] if s.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench decoder-variance", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"defaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--data", help=f"MNIST .npz (key 'data') or IDX images; default ${ENV}")
    parser.add_argument("--out", default="vaepatch-decoder-variance", help="output folder (json, md, png)")
    parser.add_argument("--quick", action="store_true", help="smoke size; explicit flags still win")
    parser.add_argument("--mu", help="comma-separated subset of sigmoid,identity")
    parser.add_argument("--scales", help="decoded-scale specs, ';'-separated (or ',' outside parentheses)")
    parser.add_argument("--lrs", help="comma-separated Adam learning rates")
    parser.add_argument("--seeds", type=int, help="seeds per cell")
    parser.add_argument("--seed", type=int, default=0, help="base seed: run i of a cell uses seed + i")
    parser.add_argument("--epochs", type=int, help="epoch cap per run")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)

    mus = [m.strip() for m in args.mu.split(",") if m.strip()]
    if not mus or any(m not in MUS for m in mus):
        parser.error(f"--mu takes a comma-separated subset of {','.join(MUS)}, got {args.mu!r}")
    try:
        scale_specs = [scales.get(s).spec for s in _split_specs(args.scales)]
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError as e:
        parser.error(str(e))
    if not scale_specs or not lrs or args.seeds < 1 or args.epochs < 1 or args.batch_size < 1:
        parser.error("need at least one scale and one lr, and --seeds, --epochs, --batch-size >= 1")
    try:
        path = resolve_data(args.data)
        images = load_mnist(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"vaepatch bench decoder-variance: {e}", file=sys.stderr)
        return 2
    train, test = split(images)
    train_levels, test_levels = _levels(train), _levels(test)
    print(f"data: {path}: {len(images)} images -> {len(train)} train / {len(test)} test "
          "(seed-0 permutation, last 10% held out); x = (k + u) / 256, u ~ U(0, 1)")

    from tqdm import tqdm

    configs = [RunConfig(mu, spec, lr, args.seed + i, args.epochs, args.batch_size)
               for mu in mus for spec in scale_specs for lr in lrs for i in range(args.seeds)]
    runs = []
    wall = time.perf_counter()
    with tqdm(total=len(configs) * args.epochs, unit="epoch", file=sys.stderr) as bar:
        for c in configs:
            bar.set_postfix_str(f"{c.mu} {label(scales.get(c.scale).spec)} lr={c.lr:g} seed={c.seed}")
            r = train_run(c, train_levels, test_levels, on_epoch=lambda _: bar.update(1))
            bar.update(c.epochs - r["epochs_trained"])
            runs.append(r)
    wall = time.perf_counter() - wall
    epochs_done = sum(r["epochs_trained"] for r in runs)
    s_per_epoch = sum(r["train_seconds"] for r in runs) / max(1, epochs_done)

    rows = summarize(runs)
    lines = table_lines(rows)
    header = (f"Decoder variance (paper section 7.2 / Table 3 at CPU scale): {len(configs)} runs, "
              f"{args.epochs}-epoch cap, batch {args.batch_size}, Adam, seeds {args.seed}..{args.seed + args.seeds - 1}")
    timing = (f"training: {s_per_epoch:.2f} s/epoch ({len(train)} images, 1 thread), "
              f"{epochs_done} epochs trained, total wall {wall:.0f} s")
    print("\n".join([header, ""] + lines + ["", PAPER_NOTE, timing]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": str(path), "n_train": len(train), "n_test": len(test), "mu": mus, "scales": scale_specs,
            "lrs": lrs, "seeds": args.seeds, "seed": args.seed, "epochs": args.epochs,
            "batch_size": args.batch_size, "s_per_epoch": s_per_epoch, "wall_seconds": wall,
            "bits_per_dim": "nelbo_per_image / (784 ln 2) + 8", "paper": PAPER_NOTE}
    (out / "decoder_variance.json").write_text(json.dumps({"meta": meta, "cells": rows, "runs": runs}, indent=1))
    (out / "decoder_variance.md").write_text("\n".join([f"# {header}", ""] + lines + ["", PAPER_NOTE, "", timing]) + "\n")
    plot(rows, out / "decoder_variance.png")
    print(f"wrote {out / 'decoder_variance.json'}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
