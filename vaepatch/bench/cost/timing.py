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

__all__ = ["rounds", "interleaved", "ratio", "switch", "timed", "synced", "row", "table"]


def rounds(steps_by_name: dict, steps: int, warmup: int, desc: str, before=None) -> dict:
    """Seconds per name and timed round: ``steps`` rounds after ``warmup`` untimed ones.

    ``steps_by_name``: ``{name: fn(i)}``; ``fn`` returns the seconds it timed itself, or None to
    be timed here around the call. ``before(name)`` runs untimed before each step (e.g. to switch
    a patch on or off: :func:`switch`).
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
    return times


def interleaved(steps_by_name: dict, steps: int, warmup: int, desc: str, before=None) -> dict:
    """Median seconds per name over :func:`rounds`."""
    return {name: statistics.median(ts) for name, ts in rounds(steps_by_name, steps, warmup, desc, before).items()}


def ratio(times: dict, name: str, base: str = "vanilla") -> dict:
    """``name`` over ``base``, one ratio per round (the two steps ran back to back): the median and the
    quartiles of those ratios, the spread a reader needs to judge a 2% difference."""
    ratios = sorted(a / b for a, b in zip(times[name], times[base]))
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": median, "q1": q1, "q3": q3, "rounds": len(ratios)}


def switch(patchsets: dict):
    """A ``before`` hook: only the named step's patch set applied (``patchsets``: name -> PatchSet;
    a name without one, e.g. "vanilla", runs with none)."""
    def before(name):
        for patchset in patchsets.values():
            patchset.revert()
        if name in patchsets:
            patchsets[name].apply()
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


def row(variant, medians, steps, ratios=None, **extra):
    """One result: the variant, ``extra`` (e.g. fuse=...), both medians, patched / vanilla (the median of
    per-round ratios and their quartiles when ``ratios`` (:func:`ratio`) is given)."""
    r = {"variant": variant, **extra, "vanilla_s": medians["vanilla"], "patched_s": medians["patched"],
         "ratio": medians["patched"] / medians["vanilla"], "steps": steps, "threads": torch.get_num_threads()}
    if ratios is not None:
        r.update(ratio=ratios["median"], ratio_q1=ratios["q1"], ratio_q3=ratios["q3"])
    return r


def table(rows, steps, warmup, columns=()):
    """The printed table: variant, ``columns`` ((header, width, row -> str) each), vanilla ms,
    patched ms, ratio; the header says what the medians are over."""
    head = f"{'variant':18} " + "".join(f"{header:{width}} " for header, width, _ in columns)
    spread = any("ratio_q1" in r for r in rows)
    what = "per-round ratios, median [quartiles]" if spread else "ratio of the medians"
    lines = [head + f"{'vanilla ms':>11} {'patched ms':>11} {'ratio':>7}{' [q1, q3]':>16}   "
             f"(median of {steps} interleaved rounds after {warmup} warm-up, {rows[0]['threads']} threads; {what})"]
    for r in rows:
        cells = "".join(f"{cell(r):{width}} " for _, width, cell in columns)
        quartiles = f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]" if "ratio_q1" in r else ""
        lines.append(f"{r['variant']:18} {cells}{1e3 * r['vanilla_s']:11.2f} {1e3 * r['patched_s']:11.2f} "
                     f"{r['ratio']:7.3f} {quartiles:>15}")
    return "\n".join(lines)
