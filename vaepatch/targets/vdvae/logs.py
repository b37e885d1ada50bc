"""openai/vdvae's own ``log.jsonl``: eval losses for ``vaepatch compare``, and runs made without the launcher."""
from __future__ import annotations

import math
from pathlib import Path

from vaepatch.runs.events import Counts
from vaepatch.runs.logs import UpstreamLog, read_jsonl_lenient

__all__ = ["LOG", "WINDOW_NOTE", "UPSTREAM_LOG"]

LOG = "log.jsonl"
WINDOW_NOTE = (
    "counted from VDVAE's own train_loss records: their skipped_updates/nan fields are sums over the "
    "last iters_per_print steps, and the windows overlap (extra records at early steps and at each save). "
    "Only records at multiples of iters_per_print (with an lr field) are used, which tile the steps "
    "without overlap; steps after the last such record are not covered; NaN counts are exact for one "
    "rank only (upstream averages the per-rank NaN flags). Use `vaepatch run vdvae` for exact counts.")


def _evals(records) -> list:
    return [r["elbo"] for r in records if r.get("type") in ("eval_loss", "test_loss")
            and isinstance(r.get("elbo"), (int, float))]


def eval_losses(logdir: Path, problems: list) -> list:
    """VDVAE's eval and test ELBOs (nats/dim) in logged order, from ``logdir/log.jsonl``."""
    log = Path(logdir) / LOG
    return _evals(read_jsonl_lenient(log, problems)) if log.is_file() else []


def read_run(path: Path, problems: list) -> dict:
    """A run folder holding only VDVAE's log.jsonl: counts from de-duplicated windows (see WINDOW_NOTE)."""
    records = read_jsonl_lenient(Path(path) / LOG, problems)
    hparams = {r["key"]: r.get("value") for r in records if r.get("type") == "hparam" and "key" in r}
    window = int(hparams.get("iters_per_print") or 1)
    name = f"vdvae log ({hparams.get('desc', Path(path).name)})"
    run = dict(variant=name, spec=name, seed=hparams.get("seed"), source="vdvae-log", loss_unit="nats/dim",
               status="VDVAE log (no launcher)", evals=_evals(records))
    windows = {}
    for r in records:  # the later record of a step wins (a resumed run appends to the same log)
        if r.get("type") == "train_loss" and "lr" in r and isinstance(r.get("step"), int) and r["step"] % window == 0:
            windows[r["step"]] = r
    if not windows:
        problems.append(f"{Path(path) / LOG}: no train_loss records at multiples of iters_per_print={window}")
        return run
    problems.append(WINDOW_NOTE)
    steps = sorted(windows)
    # per window: sum over its steps of (ranks with a NaN) / ranks -- a step count for one rank
    nan = sum(round(max(float(windows[s].get("distortion_nans", 0)), float(windows[s].get("rate_nans", 0))))
              for s in steps)
    skipped = sum(int(windows[s].get("skipped_updates", 0)) for s in steps)
    run["counts"] = Counts(steps=steps[-1] + 1, ranks=int(hparams.get("mpi_size") or 1), nan_steps=nan,
                           grad_skips=max(skipped - nan, 0), skipped=skipped)
    run["curve"] = [(s, float(windows[s]["elbo"]) if math.isfinite(float(windows[s].get("elbo", math.nan))) else None,
                     bool(windows[s].get("skipped_updates"))) for s in steps]
    return run


UPSTREAM_LOG = UpstreamLog("vdvae", eval_losses, marker=LOG, read_run=read_run)
