"""The stability-margin bench's reading of its runs: each cell's state and end NELBO, each variant's
margin per skip policy, the Markdown tables and the heat map.

A cell (variant, learning rate, skip policy) **passes** when every seed's run passed
(``vaepatch.runs.verdict``), **fails** when one did not, and is **not run** while any seed's run is
missing. A variant's **margin** is the largest rate that passed below its lowest failing one; rates
below it that were not run are taken to pass too (a rate that trains, trains at lower rates: the
search runs only the cells that decide the margin). The margin is **settled** when the grid's next
rate above it is a failure (or it is the grid's top); otherwise the grid is incomplete there.
"""
from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

from vaepatch import markdown
from vaepatch.compare import mean_std

__all__ = ["cell_summary", "step_counts", "provenance", "cell_state", "margins", "grid_lines", "margin_lines",
           "broke_lines", "plot", "fmt_lr"]


def fmt_lr(lr: float) -> str:
    """A rate as people write it: 0.1, 0.316, 0.005."""
    return f"{lr:.3g}"


def cell_state(runs: list) -> str | None:
    """False (a seed's run failed), True (every seed's run passed), None (not known: a run is missing)."""
    if any(not r["passed"] and r["verdict"] != "not run" for r in runs):
        return False
    if not runs or any(r["verdict"] == "not run" for r in runs):
        return None
    return True


def cell_summary(runs: list) -> dict:
    """What a cell's seeds did: state, failures by verdict, end NELBO of the passing runs (mean, std, n),
    spikes (runs with one, total, the largest ratio and its step), skips, non-finite steps."""
    verdicts: dict[str, int] = {}
    for r in runs:
        if not r["passed"] and r["verdict"] != "not run":
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    spiky = [r["spikes"] for r in runs if r["spikes"]["count"]]
    worst = max(spiky, key=lambda s: s["max_ratio"], default=None)
    not_run = sum(r["verdict"] == "not run" for r in runs)
    return {"state": cell_state(runs), "n_runs": len(runs), "not_run": not_run,
            "failed": sum(not r["passed"] for r in runs) - not_run,
            "failures": verdicts, "end_nelbo": mean_std([r["end_nelbo"] for r in runs if r["passed"]]),
            "spikes": {"runs_with_spikes": len(spiky), "count": sum(s["count"] for s in spiky),
                       "max_ratio": worst["max_ratio"] if worst else None,
                       "max_step": worst["max_step"] if worst else None},
            "grad_skips": sum(r["grad_skips"] for r in runs), "amp_skips": sum(r["amp_skips"] for r in runs),
            "nonfinite_loss_steps": sum(r["nonfinite_loss_steps"] for r in runs),
            **step_counts([r for r in runs if r["verdict"] != "not run"])}


def step_counts(runs: list) -> dict:
    """Over a cell's finished runs, as the paper's Table 4 counts them: NaN steps (mean, max), updates
    skipped per reason (mean), and the share of steps whose update was applied (mean, min)."""
    def mean(key):
        values = [r.get(key) for r in runs if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    nan = [r.get("nan_steps", 0) for r in runs]
    applied = [r["applied_share"] for r in runs if r.get("applied_share") is not None]
    return {"nan_steps": {"mean": statistics.fmean(nan) if nan else None, "max": max(nan, default=None)},
            "skips_by_reason": {"nan": mean("nan_steps"), "grad": mean("grad_skips"), "amp": mean("amp_skips")},
            "applied_share": {"mean": statistics.fmean(applied) if applied else None,
                              "min": min(applied, default=None)}}


def provenance(cells: dict, seconds: float) -> dict:
    """What a grid's runs ran on, from their run.json: the machines, the vaepatch and upstream commits,
    the runs' own wall time (summed) beside this command's (a report-only pass takes seconds)."""
    runs = [r for policy in cells.values() for seeds in policy.values() for r in seeds if r["verdict"] != "not run"]

    def distinct(key):
        seen = []
        for r in runs:
            if r.get(key) is not None and r[key] not in seen:
                seen.append(r[key])
        return seen

    walls = [r["wall_seconds"] for r in runs if r.get("wall_seconds") is not None]
    return {"machines": distinct("machine"), "vaepatch_commits": distinct("vaepatch_commit"),
            "upstream_commits": distinct("upstream_commit"), "runs": len(runs),
            "runs_wall_seconds": sum(walls) if walls else None, "wall_seconds": seconds}


def margins(states: dict, lrs: list, names: list) -> dict:
    """Per variant: ``margin``, ``first_failing``, ``settled``, ``passes_above_failure``, ``ratio`` (over
    vanilla's margin). ``states[(name, lr)]`` is :func:`cell_state`'s True / False / None."""
    out = {}
    for name in names:
        state = [states.get((name, lr)) for lr in lrs]
        first_fail = next((lr for lr, ok in zip(lrs, state) if ok is False), None)
        below = [lr for lr, ok in zip(lrs, state) if ok is True and (first_fail is None or lr < first_fail)]
        margin = below[-1] if below else None
        if margin is None:
            settled = first_fail == lrs[0]
        else:
            i = lrs.index(margin)
            settled = i == len(lrs) - 1 or lrs[i + 1] == first_fail
        out[name] = {"margin": margin, "first_failing": first_fail, "settled": settled,
                     "passes_above_failure": any(ok is True for lr, ok in zip(lrs, state)
                                                 if first_fail is not None and lr > first_fail)}
    base = out.get("vanilla", {}).get("margin")
    for row in out.values():
        row["ratio"] = row["margin"] / base if base and row["margin"] else None
    return out


def _loss(stat: dict, of: int) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{stat['mean']:.3g} ± {stat['std']:.2g}" if stat["n"] > 1 else f"{stat['mean']:.3g}"
    return text + (f" ({stat['n']} of {of})" if stat["n"] < of else "")


def _cell_text(summary: dict) -> str:
    if summary["state"] is None:
        done = summary["n_runs"] - summary["not_run"]
        return "not run" if not done else f"{done} of {summary['n_runs']} run, passed so far"
    if summary["state"]:
        text = f"pass · {_loss(summary['end_nelbo'], summary['n_runs'])}"
    else:
        why = ", ".join(f"{k} {v}" for k, v in sorted(summary["failures"].items()))
        ran = summary["n_runs"] - summary["not_run"]
        text = f"**{summary['failed']}/{ran} failed** ({why})"
        text += f", {summary['not_run']} not run" if summary["not_run"] else ""
        if summary["end_nelbo"]["n"]:
            text += f" · {_loss(summary['end_nelbo'], summary['n_runs'])}"
    nan = summary.get("nan_steps") or {}
    if nan.get("max"):
        text += f" · NaN steps {nan['mean']:.3g} (max {nan['max']})"
    grad = (summary.get("skips_by_reason") or {}).get("grad")
    if grad:
        text += f" · grad skips {grad:.3g}"
    if summary["spikes"]["runs_with_spikes"]:
        text += f" · spikes in {summary['spikes']['runs_with_spikes']} (max {summary['spikes']['max_ratio']:.2g}×)"
    return text


def grid_lines(summaries: dict, lrs: list, names: list) -> list:
    """The grid for one skip policy: a row per variant, a column per rate; each cell the verdict and
    the end NELBO of its passing runs (mean ± std over seeds)."""
    rows = [[f"`{n}`"] + [_cell_text(summaries[(n, lr)]) for lr in lrs] for n in names]
    return markdown.table(["variant"] + [f"lr {fmt_lr(lr)}" for lr in lrs], rows)


def _at(summaries: dict, name: str, lr) -> str:
    """The cell's end NELBO over its passing runs, or what stopped it."""
    if lr is None:
        return "—"
    s = summaries[(name, lr)]
    if s["state"] is None:
        return "not run"
    return _loss(s["end_nelbo"], s["n_runs"]) if s["state"] else f"failed {s['failed']}/{s['n_runs']}"


def _margin_cells(m: dict, summaries: dict, name: str, vanilla_margin) -> list:
    margin = m["margin"]
    if margin is None and m["settled"]:
        text = "none"
    elif margin is None:
        text = (f"< {fmt_lr(m['first_failing'])} (rate below not run)" if m["first_failing"] is not None
                else "not known yet")
    elif not m["settled"]:
        text = fmt_lr(margin) + " (≥; rate above not run)"
    elif m["first_failing"] is None:  # passed at the grid's top: the margin lies beyond it
        text = f"≥ {fmt_lr(margin)} (the grid's top)"
    else:
        text = fmt_lr(margin)
    ratio = f"×{m['ratio']:.3g}" if m["ratio"] else "—"
    return [text, ratio, _at(summaries, name, margin), _at(summaries, name, vanilla_margin)]


def margin_lines(results: dict, summaries: dict, names: list) -> list:
    """Margins side by side, one group of columns per skip policy: margin, × vanilla, the end NELBO there
    and at vanilla's margin (the same rate as vanilla's best)."""
    policies = list(results)
    columns = ("margin", "× vanilla", "end NELBO at margin", "end NELBO at vanilla's margin")
    header = ["variant"] + [h + (f" (skip {p})" if len(policies) > 1 else "") for p in policies for h in columns]
    vanilla = {p: results[p].get("vanilla", {}).get("margin") for p in policies}  # none in a grid of given cells
    rows = [[f"`{n}`"] + [c for p in policies for c in _margin_cells(results[p][n], summaries[p], n, vanilla[p])]
            for n in names]
    return markdown.table(header, rows)


def _why(run: dict) -> str:
    """One run's verdict in words, with what its events counted: NaN steps (and the first), skips."""
    verdict = run["verdict"]
    if verdict == "untrained":
        text = (f"did not end trained: end NELBO {run['end_nelbo']:.3g} vs first step's {run['first_nelbo']:.3g}"
                if run["end_nelbo"] is not None and run["first_nelbo"] is not None else "did not end trained")
    elif verdict == "mostly skipped" and run.get("end_applied_share") is not None:
        text = f"mostly skipped: {run['end_applied_share']:.0%} of its last 10% of steps applied"
    elif verdict in ("non-finite", "stalled") and run["first_failure"]:
        text = f"{verdict} (first failing step: {run['first_failure']})"
    elif verdict == "passed":
        text = "passed"
    else:
        text = f"{verdict} ({run['status']})"
    counted = []
    if run.get("nan_steps"):
        first = run.get("first_nonfinite_loss_step")  # None: NaN in the gradient only, every loss finite
        counted.append(f"{run['nan_steps']} NaN steps" + (f", the first at step {first}" if first is not None
                                                          else " (NaN gradients, every loss finite)"))
    for key, words in (("grad_skips", "high-gradient skips"), ("amp_skips", "AMP skips")):
        if run.get(key):
            counted.append(f"{run[key]} {words}")
    return text + (f"; {', '.join(counted)}" if counted else "")


def broke_lines(results: dict, cells: dict) -> list:
    """At each variant's first failing rate, per skip policy: what broke, per seed (from the events'
    provenance), and the largest spike of each run."""
    lines = []
    for policy, result in results.items():
        for name, r in result.items():
            if r["first_failing"] is None:
                continue
            skip = f", skip {policy}" if len(results) > 1 else ""
            lines.append(f"- `{name}`{skip}, lr {fmt_lr(r['first_failing'])}:")
            for run in cells[policy][(name, r["first_failing"])]:
                spike = run["spikes"]
                extra = (f"; {spike['count']} spike(s), largest {spike['max_ratio']:.3g}× at step {spike['max_step']}"
                         if spike["count"] else "")
                lines.append(f"  - seed {run['seed']}: {_why(run)}{extra}")
    return lines


def plot(summaries: dict, lrs: list, names: list, path: Path, title: str) -> None:
    """One heat map per skip policy, side by side: failed seeds / seeds per (variant, rate), and below
    the count the end NELBO of the passing runs; grey where a cell was not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    policies = list(summaries)
    fig, axes = plt.subplots(1, len(policies), figsize=(1.6 + 1.25 * len(lrs) * len(policies), 1.4 + 0.5 * len(names)),
                             squeeze=False, sharey=True)
    for ax, policy in zip(axes[0], policies):
        frac = np.full((len(names), len(lrs)), np.nan)
        for i, n in enumerate(names):
            for j, lr in enumerate(lrs):
                s = summaries[policy][(n, lr)]
                if s["state"] is not None:
                    frac[i, j] = s["failed"] / (s["n_runs"] - s["not_run"])
                    loss = s["end_nelbo"]["mean"]
                    text = f"{s['failed']}/{s['n_runs'] - s['not_run']}" + (f"\n{loss:.3g}" if loss is not None else "")
                else:
                    text = "not run"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
        cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#dddddd")
        ax.imshow(np.ma.masked_invalid(frac), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lrs)), [fmt_lr(lr) for lr in lrs])
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("learning rate")
        ax.set_title(f"skip rule: {policy}" if len(policies) > 1 else "", fontsize=10)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
