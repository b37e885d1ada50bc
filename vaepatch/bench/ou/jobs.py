"""Training the MLP hierarchy on MNIST for the OU benches (``ou-collapse``, ``phase``): data, jobs, flags.

Each job trains one ``MLPHierarchy`` (a variant, an optional OU rho) in its own spawned process with
one torch thread, and measures it on the unsmoothed model; one tqdm bar counts every training step.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from vaepatch.mnist import ENV, load_mnist
from vaepatch.mnist import resolve as resolve_data
from vaepatch.models.mlp_hierarchy import INITS, MLPHierarchy, binarize
from vaepatch.models.mlp_training import train
from vaepatch.variant import OU, Variant

__all__ = ["ENV", "resolve_data", "load_images", "load_data", "split", "validation_set", "config_variant",
           "fingerprint", "measure", "run_one", "run_jobs", "add_training_args"]


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


FINGERPRINT_KEYS = ("config", "rho", "samples", "seed", "base", "latents", "batch", "lr", "warmup", "init",
                    "eval_every", "eval_k", "eval_passes", "threshold")


def fingerprint(job: dict) -> dict:
    """What a checkpoint must agree on to be resumed: every setting but the step budget, and the data."""
    out = {key: job.get(key) for key in FINGERPRINT_KEYS}
    out.update(latents=list(job["latents"]), train=[len(job["train"]), int(np.asarray(job["train"]).sum())],
               val=[len(job["val"]), int(job["val"].sum())])
    return out


def measure(model: MLPHierarchy, val: torch.Tensor, k: int, passes: int, threshold: float) -> dict:
    """Validation ELBO, L_k, KL per layer and (with passes >= 2) active units of the unsmoothed model."""
    ev = model.evaluate(val, k=k)
    out = dict(elbo=ev["elbo"], iw_bound=ev["iw_bound"], k=ev["k"], kl_per_layer=ev["kl_per_layer"],
               top_kl=ev["kl_per_layer"][-1], recon=ev["recon"])
    if passes:
        au = model.active_units(val, passes=passes, threshold=threshold)
        out.update(active_paper=au["paper"], active_corrected=au["corrected"], passes=au["passes"],
                   paper_variance=[v.tolist() for v in au["paper_variance"]],
                   corrected_variance=[v.tolist() for v in au["corrected_variance"]])
    return out


def run_one(job: dict, progress_queue=None) -> dict:
    """Train one model and measure it (unsmoothed): the per-run numbers that go to the JSON.

    Optional job keys: ``warmup`` (KL annealing steps), ``init`` (MLPHierarchy's), ``eval_every`` with
    ``eval_k`` / ``eval_passes`` (measurements along training, on the seed-fixed stream), and
    ``checkpoint`` with ``checkpoint_every`` (resumable training, see ``mlp_training.train``).
    """
    torch.set_num_threads(job.get("threads", 1))
    torch.manual_seed(job["seed"])
    variant = config_variant(job["base"], job["rho"], job["samples"])
    model = MLPHierarchy(x_dim=job["train"].shape[1], latents=job["latents"], variant=variant,
                         init=job.get("init", "default"))
    progress = (lambda n: progress_queue.put(n)) if progress_queue is not None else job.get("progress")
    val, threshold = job["val"], job["threshold"]

    def along(step, m):
        torch.manual_seed(20_000 + job["seed"])
        keep = ("elbo", "kl_per_layer", "active_paper", "active_corrected")
        found = measure(m, val, job.get("eval_k", 1), job.get("eval_passes", 0), threshold)
        return {key: found[key] for key in keep if key in found}

    evals = []
    start = time.perf_counter()
    history = train(model, job["train"], job["steps"], batch=job["batch"], lr=job["lr"], seed=job["seed"],
                    progress=progress, warmup=job.get("warmup", 0), evals=evals,
                    evaluate=along if job.get("eval_every") else None, eval_every=job.get("eval_every", 0),
                    checkpoint=job.get("checkpoint"), checkpoint_every=job.get("checkpoint_every", 0),
                    fingerprint=fingerprint(job) if job.get("checkpoint") else None)
    session = time.perf_counter() - start
    out = dict(config=job["config"], rho=job["rho"], samples=job["samples"] if job["rho"] is not None else None,
               seed=job["seed"], variant=variant.spec, steps_done=history[-1][0] if history else 0,
               train_seconds=evals[-1]["train_seconds"] if evals else session, history=history, evals=evals,
               finite=bool(history) and math.isfinite(history[-1][1]))
    if not out["finite"]:
        return out
    model.eval()
    torch.manual_seed(10_000 + job["seed"])
    out.update(measure(model, val, job["k"], job.get("passes", 0), threshold))
    out["eval_seconds"] = time.perf_counter() - start - session
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


def add_training_args(parser) -> None:
    """The MLP-hierarchy training flags ou-collapse and phase share (seed, K, scales, size, optimiser, data, jobs)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, help="K, OU copies per prior")
    parser.add_argument("--base", default="vanilla", help="variant for the scales (default: exp on both sides)")
    parser.add_argument("--latents", default="40,40,40,40")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=0, help="KL annealing: KL weight min(1, step / N) (0 = off)")
    parser.add_argument("--init", default="default", choices=INITS,
                        help="weight init: torch's Linear default, or Glorot-uniform weights and zero biases")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-val", type=int)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (1 thread each)")
