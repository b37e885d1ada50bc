"""`vaepatch bench decoder-variance`: the paper's section 7.2 / Table 3 at CPU scale.

Learning the decoder's variance: a one-latent-layer VAE on MNIST whose decoder outputs, per pixel,
a mean mu and the raw parameter p of a Normal's scale gamma (``vaepatch.models.mnist_vae``; the
Global row shares one gamma over all pixels). The question is which parameterization of gamma
trains without failing, and at what test likelihood.

The paper's protocol (the default): training sees the 256 levels as given, x = k / 256, with NO
noise, so pixels that are constant over the data (the corners are always 0) let gamma shrink
without limit; noise is added only to evaluate the NLL. ``--train-noise`` trains on dequantized
data instead (x = (k + u) / 256, fresh u every step), which floors gamma near the quantization
noise std alpha, so no parameterization can fail.

A run fails in one of two ways, each recorded with its epoch (training goes on after a degenerate
step, so a degenerate run can still turn NaN later; it is counted as NaN then):
  NaN         the training loss is not finite (the run stops there);
  degenerate  the decoded log gamma of some pixel fell below log(float32 tiny) = -87.3: gamma itself
              is no longer a normal float32, so any code that forms gamma and takes its log (NaiveExp,
              torch.distributions.Normal) fails; the loss stays finite only because vaepatch never
              computes log(exp(p)).
Also recorded, not counted as a failure: the first epoch whose mean training loss is below
784 (log alpha + log(2 pi) / 2), the smallest negative ELBO a model with gamma >= alpha can reach.

Data: the images of one MNIST file (.npz with key ``data``, N x 28 x 28 uint8, or IDX). A seed-0
permutation (independent of --seed) holds out the last 10% as the test set and the 10% before it
as the validation set (8000 / 1000 / 1000 for the 10k test file). As in the paper, the model of
the epoch with the best validation NLL is the one tested.

NLL: the negative ELBO (one z sample, fixed dequantization noise u) per image, for the density on
the 0..1 scale, converted to the 0..255 discrete scale:

    bits/dim = nelbo_per_image / (784 ln 2) + log2(256)

(each 8-bit bin has width 1/256, so -log2 P(k) <= -log2 p(x) + 8 by Jensen; a uniform density on
[0, 1] gives exactly 8 bits/dim).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vaepatch import scales
from vaepatch.bench.reparam import decoder_variance_report as report
from vaepatch.bench import fill_defaults, paper_tables
from vaepatch.mnist import ENV, MNIST_SOURCE, load_mnist
from vaepatch.variant import split_list
from vaepatch.mnist import resolve as resolve_data
from vaepatch.models.mnist_vae import GLOBAL, LATENT, MUS, PIXELS, VAE, scale_spec

summarize, table_lines, row_line, label = report.summarize, report.table_lines, report.row_line, report.label

ALPHA = "1/(256*sqrt(12))"  # the 8-bit quantization noise std on the 0..1 scale
SCALES = ["naive_exp", "exp", "upbounded1", f"downbounded({ALPHA})", f"bounded({ALPHA}, 1)", GLOBAL + "naive_exp"]
LRS = [1e-4]
# below this decoded log gamma, gamma = exp(log gamma) is subnormal or 0 in float32
UNDERFLOW_LOG = math.log(torch.finfo(torch.float32).tiny)
# the smallest negative ELBO (nats per image) any model with gamma >= alpha on every pixel can reach
LOSS_FLOOR = PIXELS * (math.log(scales.PIXEL_ALPHA) + 0.5 * math.log(2 * math.pi))


# ---------------------------------------------------------------- data

def split(images: np.ndarray, fraction: float = 0.1):
    """(train, validation, test): a seed-0 permutation; the last ``fraction`` is the test set, the
    ``fraction`` before it the validation set; the same for every run."""
    order = np.random.default_rng(0).permutation(len(images))
    n = max(1, int(round(len(images) * fraction)))
    if len(images) < 3 * n:
        raise ValueError(f"need at least {3 * n} images for train / validation / test, got {len(images)}")
    return images[order[:-2 * n]], images[order[-2 * n:-n]], images[order[-n:]]


def _levels(images) -> torch.Tensor:
    """Pixel levels k in 0..255 as float32, one image per row."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).reshape(len(images), -1).float()


def dequantize(levels: torch.Tensor, generator=None) -> torch.Tensor:
    """x = (k + u) / 256, u ~ U(0, 1): a density on [0, 1] with 8-bit bins of width 1/256."""
    return (levels + torch.rand(levels.shape, generator=generator)) / 256.0


def as_given(levels: torch.Tensor) -> torch.Tensor:
    """x = k / 256: the levels without noise (the paper's training data); constant pixels stay constant."""
    return levels / 256.0


def bits_per_dim(nelbo_per_image: float, dims: int = PIXELS) -> float:
    """Negative ELBO (nats, density on the 0..1 scale) -> bits/dim on the 0..255 scale."""
    return nelbo_per_image / (dims * math.log(2.0)) + 8.0


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class RunConfig:
    mu: str
    scale: str
    lr: float
    seed: int
    epochs: int
    batch_size: int = 128
    train_noise: bool = False


def evaluate(model: VAE, levels: torch.Tensor, seed: int = 0, chunk: int = 500) -> float:
    """Mean negative ELBO per image (nats) on dequantized data, the noise (u and z) fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(levels), chunk):
            x = dequantize(levels[i:i + chunk], g)
            eps = torch.randn(len(x), LATENT, generator=g)
            total += float(model.nelbo(x, eps).double().sum())
    return total / len(levels)


def _finite_or_text(value: float):
    return value if math.isfinite(value) else str(value)


def train_run(config: RunConfig, train_levels: torch.Tensor, val_levels: torch.Tensor, test_levels: torch.Tensor,
              model: VAE | None = None, on_epoch=None) -> dict:
    """Train one model; stop at the first non-finite loss; record the first degenerate step; test the
    model of the best validation epoch.

    ``model`` lets a caller start from a prepared model (the tests force a failing one); it must
    match ``config``. ``on_epoch(n)`` is called after every epoch trained.
    """
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    if model is None:
        model = VAE(config.mu, config.scale)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    result = {**asdict(config), "scale": model.spec, "failure": None, "fail_epoch": None, "fail_step": None,
              "fail_value": None, "degenerate_epoch": None, "degenerate_step": None, "below_floor_epoch": None,
              "min_log_scale": [], "epochs_trained": 0, "train_bpd": [], "val_bpd": [], "best_epoch": None,
              "test_nelbo": None, "test_bpd": None, "train_seconds": 0.0}
    data = dequantize if config.train_noise else as_given
    n, step, best, best_state = len(train_levels), 0, math.inf, None
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        total, lowest = 0.0, math.inf
        for idx in torch.randperm(n).split(config.batch_size):
            step += 1
            nelbo, log_scale = model(data(train_levels[idx]))
            loss = nelbo.mean()
            if not torch.isfinite(loss):
                result.update(failure="nan", fail_epoch=epoch, fail_step=step, fail_value=str(float(loss.detach())))
                break
            lowest = min(lowest, float(log_scale.detach().min()))
            if lowest < UNDERFLOW_LOG and result["degenerate_epoch"] is None:
                result.update(degenerate_epoch=epoch, degenerate_step=step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if result["failure"]:
            break
        result["epochs_trained"] = epoch
        result["min_log_scale"].append(lowest)
        result["train_bpd"].append(bits_per_dim(total / n))
        if total / n < LOSS_FLOOR and result["below_floor_epoch"] is None:
            result["below_floor_epoch"] = epoch
        val = evaluate(model, val_levels, seed=1)
        result["val_bpd"].append(bits_per_dim(val) if math.isfinite(val) else None)
        if val < best:
            best, best_state, result["best_epoch"] = val, copy.deepcopy(model.state_dict()), epoch
        if on_epoch:
            on_epoch(epoch)
    result["train_seconds"] = time.perf_counter() - start
    if result["failure"] is None and result["degenerate_epoch"] is not None:
        result["failure"] = "degenerate"
        result.update(fail_epoch=result["degenerate_epoch"], fail_step=result["degenerate_step"])
    result["failed"] = result["failure"] is not None
    if result["failure"] != "nan" and best_state is not None:
        model.load_state_dict(best_state)
        nelbo = evaluate(model, test_levels)
        result["test_nelbo"] = _finite_or_text(nelbo)
        result["test_bpd"] = bits_per_dim(nelbo) if math.isfinite(nelbo) else None
    return result


# ---------------------------------------------------------------- CLI

QUICK = {"mu": "sigmoid", "scales": f"naive_exp;bounded({ALPHA}, 1)", "lrs": "1e-3", "seeds": 1, "epochs": 2}
DEFAULTS = {"mu": ",".join(MUS), "scales": ";".join(SCALES), "lrs": ",".join(f"{lr:g}" for lr in LRS),
            "seeds": 3, "epochs": 100}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench decoder-variance", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"defaults: {DEFAULTS}; --quick: {QUICK}")
    parser.add_argument("--data", help=f"MNIST images: an .npz with key 'data', or the IDX file from {MNIST_SOURCE} "
                                       f"(default ${ENV}; never downloaded)")
    parser.add_argument("--out", default="vaepatch-decoder-variance", help="output folder (json, md, png)")
    parser.add_argument("--quick", action="store_true", help="smoke size; explicit flags still win")
    parser.add_argument("--mu", help="comma-separated subset of sigmoid,identity")
    parser.add_argument("--scales", help="decoded-scale specs, ';'-separated (or ',' outside parentheses); "
                                         "global:SPEC = one scale for all pixels")
    parser.add_argument("--lrs", help="comma-separated Adam learning rates")
    parser.add_argument("--seeds", type=int, help="seeds per cell")
    parser.add_argument("--seed", type=int, default=0, help="base seed: run i of a cell uses seed + i")
    parser.add_argument("--epochs", type=int, help="epochs per run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-noise", action="store_true",
                        help="train on dequantized data (x = (k + u) / 256) instead of the paper's noise-free levels")
    args = parser.parse_args(argv)
    fill_defaults(args, DEFAULTS, QUICK)

    mus = [m.strip() for m in args.mu.split(",") if m.strip()]
    if not mus or any(m not in MUS for m in mus):
        parser.error(f"--mu takes a comma-separated subset of {','.join(MUS)}, got {args.mu!r}")
    try:
        scale_specs = [scale_spec(s) for s in split_list(args.scales)]
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError as e:
        parser.error(str(e))
    if not scale_specs or not lrs or args.seeds < 1 or args.epochs < 1 or args.batch_size < 1:
        parser.error("need at least one scale and one lr, and --seeds, --epochs, --batch-size >= 1")
    try:
        path = resolve_data(args.data)
        train, val, test = split(load_mnist(path))
    except (FileNotFoundError, ValueError) as e:
        print(f"vaepatch bench decoder-variance: {e}", file=sys.stderr)
        return 2
    levels = [_levels(part) for part in (train, val, test)]
    protocol = ("training on x = (k + u) / 256, fresh noise (--train-noise)" if args.train_noise else
                "training on x = k / 256 without noise (the paper's protocol)")
    print(f"data: {path}: {len(train) + len(val) + len(test)} images -> {len(train)} train / {len(val)} validation / "
          f"{len(test)} test (seed-0 permutation); {protocol}; validation and test NLL on (k + u) / 256")

    from tqdm import tqdm

    configs = [RunConfig(mu, spec, lr, args.seed + i, args.epochs, args.batch_size, args.train_noise)
               for mu in mus for spec in scale_specs for lr in lrs for i in range(args.seeds)]
    runs = []
    wall = time.perf_counter()
    with tqdm(total=len(configs) * args.epochs, unit="epoch", file=sys.stderr) as bar:
        for c in configs:
            bar.set_postfix_str(f"{c.mu} {report.label(c.scale)} lr={c.lr:g} seed={c.seed}")
            r = train_run(c, *levels, on_epoch=lambda _: bar.update(1))
            bar.update(c.epochs - r["epochs_trained"])
            runs.append(r)
    wall = time.perf_counter() - wall
    epochs_done = sum(r["epochs_trained"] for r in runs)
    s_per_epoch = sum(r["train_seconds"] for r in runs) / max(1, epochs_done)

    rows = report.summarize(runs)
    lines = report.table_lines(rows)
    header = (f"Decoder variance (paper section 7.2 / Table 3 at CPU scale): {len(configs)} runs, {args.epochs} "
              f"epochs, batch {args.batch_size}, Adam, seeds {args.seed}..{args.seed + args.seeds - 1}; {protocol}")
    timing = (f"training: {s_per_epoch:.2f} s/epoch ({len(train)} images, 1 thread, validation included), "
              f"{epochs_done} epochs trained, total wall {wall:.0f} s")
    print("\n".join([header, ""] + lines + ["", timing]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": str(path), "n_train": len(train), "n_val": len(val), "n_test": len(test), "mu": mus,
            "scales": scale_specs, "lrs": lrs, "seeds": args.seeds, "seed": args.seed, "epochs": args.epochs,
            "batch_size": args.batch_size, "train_noise": args.train_noise, "s_per_epoch": s_per_epoch,
            "wall_seconds": wall, "underflow_log": UNDERFLOW_LOG, "loss_floor": LOSS_FLOOR,
            "bits_per_dim": "nelbo_per_image / (784 ln 2) + 8", "paper": paper_tables.TABLE3_PROTOCOL}
    (out / "decoder_variance.json").write_text(json.dumps({"meta": meta, "cells": rows, "runs": runs}, indent=1))
    (out / "decoder_variance.md").write_text("\n".join([f"# {header}", ""] + lines + ["", timing]) + "\n")
    report.plot(runs, out / "decoder_variance.png", UNDERFLOW_LOG)
    print(f"wrote {out / 'decoder_variance.json'}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
