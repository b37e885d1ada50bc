"""`vaepatch bench activation-memory`: the memory one training step holds for backward, patched over vanilla.

For every built-in variant on each upstream whose clone is present, eager and fused (torch.compile), on the
tiny models of that upstream's ``memory.py`` (its step-time bench's): the bytes of the tensors autograd holds
for backward at the end of the forward (``vaepatch.bench.cost.measure.saved_bytes``: each storage once, a view
counting its whole storage, parameters excluded) -- a count, exact and the same on every run and machine
load -- and the rise of the peak resident set (Linux VmHWM) over one step, the median of --rss-steps, which
also holds gradients, temporaries and the allocator's slack, so it is noisier. The ratio is patched /
vanilla on the same weights, batch and seed.

Each (upstream, model, variant, mode) runs in a fresh interpreter (NVAE's module names clash with VDVAE's,
and a fresh process starts the RSS count clean): build the model, one forward for the first loss and one
warm-up step (the fused form compiles here), the steps for the RSS rise, then the count. "compiled" says
whether torch.compile made graphs, ran them without falling back to eager, and kept every function within
its recompile limit.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from vaepatch.bench.cost.measure import rss_rise, saved_bytes
from vaepatch.markdown import table

__all__ = ["RSS_STEPS", "measure_one", "measure", "table_lines", "main"]

RSS_STEPS = 5  # steps whose peak-RSS rise is measured, one by one; the median is reported


def _memory_module(target):
    """The target's ``memory`` module (its tiny model's training step), or None where it has none."""
    name = f"vaepatch.targets.{target}.memory"
    return importlib.import_module(name) if importlib.util.find_spec(name) else None


def _compiled_graphs() -> int:
    """How many graphs torch.compile has made in this process (0 where its counters are unavailable)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


class _RecompileLimit(logging.Handler):
    """Collects the functions torch.compile stopped recompiling (its recompile limit): past it, a call whose
    input layouts or shapes match none of the compiled versions runs eagerly, with only a log line."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.functions = set()

    def emit(self, record):
        text = record.getMessage()
        if "recompile_limit" in text:
            self.functions.add(text.split("function: ", 1)[-1].split("\n")[0].strip() if "function: " in text
                               else "a function")


def measure_one(target, variant, fuse, model="tiny", seed=0, threads=1, rss=RSS_STEPS) -> dict:
    """In this process: a fresh ``model`` of ``target`` with ``variant`` (``fuse``), a warm-up step, then
    ``rss`` (the median over ``rss`` steps of the peak-RSS rise over one step, bytes; 0: skipped), ``saved``
    (bytes held for backward), ``loss`` (the first, at the seed's weights), ``graphs`` (torch.compile graphs
    made), ``fallbacks`` (vaepatch's warnings that compiling failed) and ``past_limit`` (functions past
    torch.compile's recompile limit)."""
    torch.set_num_threads(threads)
    limits = _RecompileLimit()
    logging.getLogger("torch._dynamo").addHandler(limits)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _memory_module(target).training_step(variant, fuse, seed, model) as (loss, step, parameters):
                value = float(loss())  # at the seed's weights, the same for every variant
                step()  # warm-up: compiles a fused form, allocates the optimizer's state
                rises = [rss_rise(step) for _ in range(rss)]  # None each where not Linux
                rise = statistics.median(rises) if rises and None not in rises else None
                saved = saved_bytes(loss, parameters)  # the shapes, not the weights, decide it
    finally:
        logging.getLogger("torch._dynamo").removeHandler(limits)
    fallbacks = sorted({str(w.message).splitlines()[0][:200] for w in caught
                        if "vaepatch" in str(w.message) and "compile" in str(w.message)})
    return dict(target=target, model=model, variant=variant, fuse=bool(fuse), saved=saved, rss=rise, loss=value,
                graphs=_compiled_graphs(), fallbacks=fallbacks, past_limit=sorted(limits.functions))


def _fresh(job: dict) -> dict:
    """:func:`measure_one` in a fresh spawned interpreter."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_one, **job).result()


def measure(models, variants, modes=(False, True), seed=0, threads=1, rss=RSS_STEPS, progress=None) -> list:
    """Rows for vanilla and each of ``variants`` (not vanilla) in each of ``modes`` (False eager, True
    fused), per (target, model) of ``models``, each from a fresh interpreter; ``ratio`` / ``rss_ratio``:
    over that model's vanilla."""
    rows = []
    for target, model in models:
        jobs = [("vanilla", False)] + [(v, fuse) for v in variants if v != "vanilla" for fuse in modes]
        mine = []
        for variant, fuse in jobs:
            if progress:
                progress(f"{target} ({model}) {variant} {'fused' if fuse else 'eager'}")
            mine.append(_fresh(dict(target=target, model=model, variant=variant, fuse=fuse, seed=seed,
                                    threads=threads, rss=rss)))
        base = mine[0]
        for row in mine:
            row["ratio"] = row["saved"] / base["saved"]
            row["rss_ratio"] = row["rss"] / base["rss"] if row["rss"] and base["rss"] else None
        rows += mine
    return rows


def _compiled(row) -> str:
    if not row["fuse"]:
        return "—"
    if row["fallbacks"]:
        return "no: fell back to eager"
    if not row["graphs"]:
        return "no graphs"
    past = len(row.get("past_limit", ()))
    return f"yes ({row['graphs']} graphs)" + (f"; past the recompile limit: {past} function(s)" if past else "")


def table_lines(rows) -> list:
    """One Markdown row per (target, variant): saved bytes and ratio eager and fused, RSS rise beside."""
    by = {(r["target"], r["model"], r["variant"], r["fuse"]): r for r in rows}
    out = []
    for target, model, variant in dict.fromkeys((r["target"], r["model"], r["variant"]) for r in rows):
        eager, fused = by.get((target, model, variant, False)), by.get((target, model, variant, True))
        cells = [target if model == "tiny" else f"{target}, {model}", f"`{variant}`"]
        for r in (eager, fused):
            cells += [f"{r['saved']:,}", f"{r['ratio']:.4f}"] if r else ["—", "—"]
        cells.append(_compiled(fused) if fused else "—")
        for r in (eager, fused):
            cells.append(f"{r['rss'] / 2**20:.1f} ({r['rss_ratio']:.2f})" if r and r["rss_ratio"] else "—")
        out.append(cells)
    return table(["upstream", "variant", "held for backward, eager (bytes)", "× vanilla", "fused (bytes)", "× vanilla",
                  "fused compiled", "peak RSS rise, eager: MiB (×)", "fused: MiB (×)"], out)


def _loss_notes(rows) -> list:
    """Per model, the first loss of vanilla and how far each fused patch's is from its eager one's."""
    notes = []
    for target, model in dict.fromkeys((r["target"], r["model"]) for r in rows):
        mine = [r for r in rows if (r["target"], r["model"]) == (target, model)]
        eager = {r["variant"]: r["loss"] for r in mine if not r["fuse"]}
        gaps = [abs(r["loss"] - eager[r["variant"]]) / abs(eager[r["variant"]])
                for r in mine if r["fuse"] and r["variant"] in eager]
        notes.append(f"{target} ({model}) first loss: vanilla {eager['vanilla']:.6g}"
                     + (f"; fused vs eager patch, largest relative gap {max(gaps):.1e}" if gaps else ""))
    return notes


def _models_present(names) -> tuple[list, list]:
    """((target, model) pairs to measure, a note per target): each needs a memory module and a clone."""
    from vaepatch.upstream import UpstreamError, locate

    present, notes = [], []
    for name in names:
        module = _memory_module(name)
        try:
            clone = locate(name)
        except UpstreamError as err:
            clone, why = None, str(err).splitlines()[0]
        else:
            why = f"no clone; run `vaepatch fetch {name}`"
        if module is None:
            notes.append(f"{name}: skipped (no vaepatch/targets/{name}/memory.py)")
        elif clone is None:
            notes.append(f"{name}: skipped ({why})")
        else:
            present += [(name, model) for model in module.MODELS]
            notes += [f"{name}{'' if model == 'tiny' else ', ' + model}: {label}" for model, (label, _) in
                      module.MODELS.items()] + [f"{name}: clone at {clone}"]
    return present, notes


def main(argv=None) -> int:
    from vaepatch import Variant, targets, variants

    parser = argparse.ArgumentParser(prog="vaepatch bench activation-memory", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(targets.NAMES), help="comma-separated upstreams (default: all)")
    parser.add_argument("--variants", default=",".join(v for v in variants() if v != "vanilla"),
                        help="comma-separated variants to compare with vanilla (default: every built-in one)")
    parser.add_argument("--fuse", choices=["off", "on", "both"], default="both",
                        help="the eager patch, the torch.compile-fused one, or both (default)")
    parser.add_argument("--rss-steps", type=int, default=RSS_STEPS,
                        help=f"steps whose peak-RSS rise is measured, median reported (default {RSS_STEPS}; 0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per interpreter (default 1)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    from vaepatch.variant import split_list

    wanted = split_list(args.targets)
    unknown = [t for t in wanted if t not in targets.NAMES]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; supported: {', '.join(targets.NAMES)}")
    names = split_list(args.variants)
    try:
        for name in names:
            Variant.parse(name)  # an unknown name says what is accepted, before anything is built
    except ValueError as err:
        parser.error(str(err))
    if args.rss_steps < 0:
        parser.error("--rss-steps >= 0")
    present, notes = _models_present(wanted)
    if not present:
        print("\n".join(["vaepatch bench activation-memory: no upstream to measure:"] + notes), file=sys.stderr)
        return 2
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.fuse]
    wall = time.perf_counter()
    rows = measure(present, names, modes, threads=args.threads, rss=args.rss_steps,
                   progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    wall = time.perf_counter() - wall
    print("\n".join(table_lines(rows)))
    print("\n".join([""] + notes + [f"torch {torch.__version__}, {args.threads} thread(s), {wall:.0f} s"]))
    print("\n".join(_loss_notes(rows)))
    above = [f"{r['target']} ({r['model']}) {r['variant']} {'fused' if r['fuse'] else 'eager'} ({r['ratio']:.4f})"
             for r in rows if r["ratio"] > 1]
    print("held for backward above vanilla: " + (", ".join(above) if above else "none"))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, notes=notes, torch=torch.__version__), indent=1))
    return 0
