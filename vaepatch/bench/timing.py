"""Timing configurations side by side: steps interleaved round by round, medians, ratios, the table.

Every step-time comparison in vaepatch (patched vs vanilla, OU vs plain) runs its configurations in
one process, one step of each per round, the order rotated every round, so drift in the machine's
speed (another process, thermal, the allocator warming up) hits every configuration alike.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

__all__ = ["interleaved", "toggle", "timed", "synced", "row", "table"]


def interleaved(steps_by_name: dict, steps: int, warmup: int, desc: str, before=None) -> dict:
    """Median seconds per name over ``steps`` rounds after ``warmup`` untimed ones.

    ``steps_by_name``: ``{name: fn(i)}``; ``fn`` returns the seconds it timed itself, or None to
    be timed here around the call. ``before(name)`` runs untimed before each step (e.g. to switch
    a patch on or off: :func:`toggle`).
    """
    from tqdm import tqdm

    names = list(steps_by_name)
    times = {name: [] for name in names}
    for i in tqdm(range(warmup + steps), desc=desc, unit="round", file=sys.stderr):
        for name in names[i % len(names):] + names[:i % len(names)]:
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            seconds = steps_by_name[name](i)
            seconds = time.perf_counter() - t0 if seconds is None else seconds
            if i >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def toggle(patchset, vanilla: str = "vanilla"):
    """A ``before`` hook: ``patchset`` reverted for the step named ``vanilla``, applied for every other."""
    def before(name):
        patchset.revert() if name == vanilla else patchset.apply()
    return before


def timed(fn):
    """``fn()`` -> seconds it took."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def synced(fn, device):
    """A step for :func:`interleaved` that times ``fn()`` to the end of its GPU work: on CUDA the device
    is synchronized before and after (a CUDA call returns once the work is queued); on CPU plain timing."""
    device = torch.device(device)

    def step(_i):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return step


def row(variant, medians, steps, **extra):
    """One result: the variant, ``extra`` (e.g. fuse=...), both medians, patched / vanilla."""
    return {"variant": variant, **extra, "vanilla_s": medians["vanilla"], "patched_s": medians["patched"],
            "ratio": medians["patched"] / medians["vanilla"], "steps": steps, "threads": torch.get_num_threads()}


def table(rows, steps, warmup, columns=()):
    """The printed table: variant, ``columns`` ((header, width, row -> str) each), vanilla ms,
    patched ms, ratio; the header says what the medians are over."""
    head = f"{'variant':18} " + "".join(f"{header:{width}} " for header, width, _ in columns)
    lines = [head + f"{'vanilla ms':>11} {'patched ms':>11} {'ratio':>7}   "
             f"(median of {steps} interleaved steps after {warmup} warm-up, {rows[0]['threads']} threads)"]
    for r in rows:
        cells = "".join(f"{cell(r):{width}} " for _, width, cell in columns)
        lines.append(f"{r['variant']:18} {cells}{1e3 * r['vanilla_s']:11.2f} {1e3 * r['patched_s']:11.2f} {r['ratio']:7.3f}")
    return "\n".join(lines)
