"""Training the MLP hierarchy: Adam on dynamically binarized images, resumable from a checkpoint.

A checkpoint holds everything the next step depends on (weights, Adam's moments, both random
streams, the epoch's shuffled order and position, the loss log and the evaluations so far), so a
run stopped and resumed gives the same numbers as one that never stopped.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from vaepatch.models.mlp_hierarchy import MLPHierarchy

__all__ = ["train", "CheckpointMismatch"]


class CheckpointMismatch(ValueError):
    """A checkpoint written by a run with other settings than the one asked to resume it."""


def _grey(images) -> torch.Tensor:
    grey = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    grey = grey.reshape(grey.shape[0], -1)
    return grey.float() / 255.0 if grey.dtype == torch.uint8 else grey.float()


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a run killed while saving keeps its previous checkpoint


def train(model: MLPHierarchy, images, steps: int, batch: int = 100, lr: float = 1e-3, seed: int = 0,
          progress=None, log_every: int = 100, warmup: int = 0, evaluate=None, eval_every: int = 0,
          evals: list | None = None, checkpoint=None, checkpoint_every: int = 0, fingerprint=None) -> list:
    """Adam on dynamically binarized images (a fresh Bernoulli draw of every batch), shuffled epochs.

    ``warmup`` > 0 scales the KL terms by min(1, step / warmup) (KL annealing). ``evaluate(step, model)``
    runs every ``eval_every`` steps and at the last one, on its own random stream (the training
    stream is left as it was); its results are appended to ``evals``. With ``checkpoint`` (a path),
    the state is saved there every ``checkpoint_every`` steps and at the end, and a run whose
    checkpoint exists continues from it (``fingerprint`` must equal the saved one, or
    ``CheckpointMismatch``); ``steps`` may be larger than the checkpoint's run was.
    ``progress(n)`` is called with the number of steps done since its last call. Returns the
    running mean training loss every ``log_every`` steps as (step, loss) pairs; stops at a
    non-finite loss (the last pair then holds it).
    """
    g = torch.Generator().manual_seed(seed)
    grey = _grey(images)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    evals = [] if evals is None else evals
    history, running, order, pos, start, before = [], 0.0, None, 0, 0, 0.0
    path = Path(checkpoint) if checkpoint else None
    if path is not None and path.is_file():
        state = torch.load(path, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise CheckpointMismatch(f"checkpoint {path} was written with other settings ({state['fingerprint']}) "
                                     f"than this run ({fingerprint}); resume with the same flags or use another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        g.set_state(state["generator"])
        order, pos, start, running = state["order"], state["pos"], state["step"], state["running"]
        before = state["seconds"]
        history[:], evals[:] = state["history"], state["evals"]
    if order is None:
        order = torch.randperm(grey.shape[0], generator=g)

    clock = dict(start=time.perf_counter(), evaluating=0.0)

    def seconds():
        """Training seconds so far, this run's earlier sessions included, evaluations excluded."""
        return before + time.perf_counter() - clock["start"] - clock["evaluating"]

    def save(step):
        if path is not None:
            _save(path, dict(fingerprint=fingerprint, step=step, seconds=seconds(), model=model.state_dict(),
                             optimizer=optimizer.state_dict(), torch_rng=torch.get_rng_state(),
                             generator=g.get_state(), order=order, pos=pos, running=running,
                             history=list(history), evals=list(evals)))

    def run_evaluation(step):
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            model.eval()
            evals.append(dict(step=step, train_seconds=seconds(), **evaluate(step, model)))
            model.train()
        clock["evaluating"] += time.perf_counter() - t

    model.train()
    if progress is not None and start:
        progress(start)
    reported = start
    for step in range(start + 1, steps + 1):
        if pos + batch > order.numel():
            order, pos = torch.randperm(grey.shape[0], generator=g), 0
        x = torch.bernoulli(grey[order[pos:pos + batch]], generator=g)
        pos += batch
        beta = min(1.0, step / warmup) if warmup > 0 else 1.0
        loss = model(x, beta=beta)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        running += value
        if not math.isfinite(value):
            history.append((step, value))
            break
        if step % log_every == 0 or step == steps:
            history.append((step, running / (step - (history[-1][0] if history else 0))))
            running = 0.0
        if evaluate is not None and ((eval_every and step % eval_every == 0) or step == steps):
            run_evaluation(step)
        if progress is not None and (step % 20 == 0 or step == steps):
            progress(step - reported)
            reported = step
        if checkpoint_every and step % checkpoint_every == 0 and step != steps:
            save(step)
    else:
        if start < steps or not path or not path.is_file():
            save(steps)
    return history
