"""Shared by the step-time benches (``vdvae-step-time``, ``nvae-step-time``): vanilla and patched
steps interleaved under one PatchSet, their medians and ratio, and the table.

Each bench builds its two models (same weights, same batch) and a step function per model that
returns the seconds it timed; :func:`interleaved` runs them as vanilla, patched, vanilla, ... with
the patch reverted for the vanilla step and applied for the patched one, so drift in the
machine's speed hits both alike.
"""
from __future__ import annotations

import statistics

import torch


def interleaved(patchset, steps_by_name, steps, warmup, desc):
    """Median seconds per name, over ``steps`` rounds after ``warmup`` untimed ones.

    ``steps_by_name``: ``{"vanilla": fn, "patched": fn}``, each ``fn(i) -> seconds`` for round
    ``i``, run in that order every round; the "vanilla" one runs with ``patchset`` reverted,
    every other with it applied.
    """
    from tqdm import tqdm

    times = {name: [] for name in steps_by_name}
    for i in tqdm(range(warmup + steps), desc=desc, unit="pair"):
        for name, step in steps_by_name.items():
            patchset.revert() if name == "vanilla" else patchset.apply()
            dt = step(i)
            if i >= warmup:
                times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


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
