"""`vaepatch compare`: runs grouped by variant, counted from their exact per-step events.

Reads only what runs left on disk: each run directory's ``run.json`` and ``events.jsonl``
(written by ``vaepatch run`` and ``vaepatch demo``), and through the upstream logs registered in
``vaepatch.runs.logs`` (one per target) the upstream's own eval records for the eval loss, and runs
made without the launcher (VDVAE's ``log.jsonl``). It knows no upstream beyond what ``run.json``
says. A missing, unreadable or truncated file is listed under ``problems`` with the reason; it
never crashes the report and is never silently dropped.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vaepatch.runs import events as _events
from vaepatch import markdown
from vaepatch.runs import logs as _logs
from vaepatch.runs import tensorboard as _tensorboard
from vaepatch.runs import verdict as _verdict

__all__ = ["Run", "load_run", "find_runs", "summarize", "render", "survival", "figure", "plot", "main"]



@dataclass
class Run:
    """One run: its identity, per-step curve, counts, eval losses, and anything wrong with it."""

    path: Path
    variant: str
    spec: str = ""
    seed: object = None
    status: str = "unknown"
    source: str = "events"  # or "vdvae-log"
    counts: _events.Counts = field(default_factory=_events.Counts)
    end_loss: float | None = None
    eval_final: float | None = None
    eval_best: float | None = None
    loss_unit: str | None = None
    dims_per_image: int | None = None  # for a loss in nats/image (NVAE): bits/dim = loss / ln 2 / dims
    curve: list = field(default_factory=list, repr=False)  # (step, loss or None, skipped) per step
    verdict: str = "not run"  # vaepatch.runs.verdict's word for the run, judged as its upstream trains
    problems: list[str] = field(default_factory=list)

    @property
    def bits_per_dim(self) -> float | None:
        """Final eval loss in bits/dim, when the run says its unit (nats/dim, or nats/image and the dims)."""
        if self.eval_final is None:
            return None
        if self.loss_unit == "nats/dim":
            return self.eval_final / math.log(2)
        if self.loss_unit == "nats/image" and self.dims_per_image:
            return self.eval_final / math.log(2) / self.dims_per_image
        return None


def _set_evals(run: Run, evals: list[float]) -> None:
    """Final eval loss (None if it was not finite) and the best finite one, in logged order."""
    finite = [v for v in evals if math.isfinite(v)]
    if evals:
        run.eval_final = evals[-1] if math.isfinite(evals[-1]) else None
        run.eval_best = min(finite) if finite else None


def _from_upstream_log(path: Path, run: Run, log: _logs.UpstreamLog) -> None:
    """A run folder holding only the upstream's own log (no launcher): what its reader makes of it."""
    fields = log.read_run(path, run.problems)
    _set_evals(run, fields.pop("evals", []))
    for key, value in fields.items():
        setattr(run, key, value)
    run.end_loss = _verdict.end_loss(run.curve)


def _upstream_evals(target, logdir: Path, problems: list) -> list:
    """Eval losses from the upstream's own log in ``logdir``: the target's reader, or for a run.json
    that names no known target, the first registered reader that finds any."""
    known = _logs.for_target(target)
    for log in [known] if known is not None else _logs.registered():
        evals = log.eval_losses(logdir, problems)
        if evals:
            return evals
    return []


def _log_only(path: Path):
    """The registered upstream log whose marker file alone makes ``path`` a run, or None."""
    if (path / "run.json").exists() or (path / _events.FILENAME).exists():
        return None
    return next((log for log in _logs.registered() if log.marker and (path / log.marker).exists()), None)


def load_run(path) -> Run:
    """Read one run directory; problems are collected in ``Run.problems``, never raised."""
    path = Path(path)
    run = Run(path, variant=f"? ({path.name})")
    log_only = _log_only(path)
    if log_only is not None:
        _from_upstream_log(path, run, log_only)
        return run
    manifest = {}
    try:
        manifest = json.loads((path / "run.json").read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        run.problems.append(f"{path / 'run.json'}: missing, so the variant is unknown")
    except ValueError as e:
        run.problems.append(f"{path / 'run.json'}: not readable JSON ({e})")
        manifest = {}
    run.variant = str(manifest.get("variant", run.variant))
    run.spec = str(manifest.get("variant_spec", run.variant))
    run.seed, run.loss_unit = manifest.get("seed"), manifest.get("loss_unit")
    run.status = manifest.get("status", "unknown")
    if run.status == "running":
        run.status = "running, or killed (no end recorded)"
    run.dims_per_image = manifest.get("dims_per_image")
    if manifest.get("upstream_logdir"):
        _set_evals(run, _upstream_evals(manifest.get("target"), Path(manifest["upstream_logdir"]), run.problems))
    try:
        log = _events.read(path)
    except FileNotFoundError as e:
        run.problems.append(str(e))
        return run
    run.problems.extend(f"{log.path.parent}/{p}" for p in log.problems)
    if log.duplicates:
        run.problems.append(f"{log.path}: {log.duplicates} records repeat a (step, rank); the later record was used")
    if not log.events:
        run.problems.append(f"{log.path}: no usable events")
    stall_steps = manifest.get("stall_steps")
    run.counts = _events.count(log.events, stall_steps if isinstance(stall_steps, int) and stall_steps > 0
                               else _events.STALL_STEPS)
    run.curve = _verdict.curve(log.events)
    run.end_loss = _verdict.end_loss(run.curve)
    asked = manifest.get("max_steps") or (run.curve[-1][0] + 1 if run.curve else 0)  # else: to its last step
    run.verdict = _verdict.judge(log.events, manifest.get("status", "unknown"), asked,
                                 stalled=manifest.get("stalled_since") is not None,
                                 weights_finite=manifest.get("weights_finite"))["verdict"]
    return run


def _is_run_dir(p: Path) -> bool:
    return (p / "run.json").exists() or (p / _events.FILENAME).exists() or _log_only(p) is not None


def find_runs(paths, problems: list[str] | None = None) -> list[Path]:
    """Run directories at or under ``paths`` (a run's own sub-folders, such as VDVAE's, are not
    searched again). A path with no runs at all is recorded in ``problems``."""
    problems = [] if problems is None else problems
    found: list[Path] = []

    def walk(p: Path) -> None:
        if _is_run_dir(p):
            found.append(p)
            return
        for child in sorted(c for c in p.iterdir() if c.is_dir()):
            walk(child)

    for p in map(Path, paths):
        before = len(found)
        if not p.exists():
            problems.append(f"{p}: does not exist")
        elif not p.is_dir():
            problems.append(f"{p}: not a directory (give run directories or folders of them)")
        else:
            walk(p)
            if len(found) == before:
                problems.append(f"{p}: no runs found (no run.json, events.jsonl or upstream log such as VDVAE's "
                                "log.jsonl under it)")
    return found


def mean_std(values) -> dict:
    """``{"mean", "std", "n"}`` over the values that are not None (std 0 for one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: list[Run]) -> list[dict]:
    """One dict per variant (grouped by resolved spec, in first-seen order): the JSON contract."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.spec or run.variant, []).append(run)
    out = []
    for members in groups.values():
        counts = [r.counts for r in members]
        out.append({
            "variant": members[0].variant,
            "variant_spec": members[0].spec,
            "runs": len(members),
            "verdicts": _merged([{r.verdict: 1} for r in members]),
            "steps": sum(c.steps for c in counts),
            "nan_steps": mean_std([c.nan_steps for c in counts]),
            "grad_skips": mean_std([c.grad_skips for c in counts]),
            "amp_skips": mean_std([c.amp_skips for c in counts]),
            "skipped": mean_std([c.skipped for c in counts]),
            "first_nan_step": mean_std([c.first_nan_step for c in counts]),
            "end_loss": mean_std([r.end_loss for r in members]),
            "eval_loss": mean_std([r.eval_final for r in members]),
            "best_eval_loss": mean_std([r.eval_best for r in members]),
            "bits_per_dim": mean_std([r.bits_per_dim for r in members]),
            "seeds": [r.seed for r in members],
            "status": sorted({r.status for r in members}),
            "stalled": {"runs": sum(c.stalled_since is not None for c in counts),
                        "since": [c.stalled_since for c in counts],
                        "longest_recovered_streak": [c.longest_recovered_streak for c in counts]},
            "nonfinite_origins": _merged([c.nonfinite_origins for c in counts]),
            "first_failures": [{"run": str(r.path), "seed": r.seed, "failure": r.counts.first_failure}
                               for r in members if r.counts.first_failure],
            "problems": [p for r in members for p in r.problems],
        })
    return out


def _cell(stat: dict, runs: int, digits: str = ".4g") -> str:
    if stat["n"] == 0:
        return "-"
    text = f"{stat['mean']:{digits}}" if stat["n"] == 1 else f"{stat['mean']:{digits}} ± {stat['std']:.3g}"
    return text if stat["n"] == runs else f"{text} ({stat['n']}/{runs} runs)"


COLUMNS = ("variant", "runs", "passed", "steps", "NaN steps", "high-grad skips", "AMP skips", "first NaN step",
           "end loss", "eval loss (final)", "eval loss (best)", "bits/dim", "stalled")
_KEYS = ("nan_steps", "grad_skips", "amp_skips", "first_nan_step", "end_loss", "eval_loss",
         "best_eval_loss", "bits_per_dim")


def _merged(dicts) -> dict:
    """Counts summed over runs, largest first."""
    total: dict = {}
    for d in dicts:
        for key, n in d.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))


def _stalled_cell(s: dict) -> str:
    since = [v for v in s["stalled"]["since"] if v is not None]
    if not since:
        return "0"
    return f"{len(since)}/{s['runs']} (since step {', '.join(map(str, since))})"


def _passed_cell(s: dict) -> str:
    """'2/3' and, when some did not pass, how they ended: '2/3 (stalled 1)'."""
    verdicts = s.get("verdicts", {})
    others = ", ".join(f"{v} {n}" for v, n in verdicts.items() if v != "passed")
    return f"{verdicts.get('passed', 0)}/{s['runs']}" + (f" ({others})" if others else "")


def rows(summary: list[dict]) -> list[list[str]]:
    return [[s["variant"], str(s["runs"]), _passed_cell(s), str(s["steps"])] + [_cell(s[k], s["runs"]) for k in _KEYS]
            + [_stalled_cell(s)] for s in summary]


TOP_ORIGINS = 5  # origins listed per variant in the Markdown report


def provenance_lines(summary: list[dict]) -> list[str]:
    """Where the runs broke: per variant, non-finite steps by origin, and each run's first failure."""
    lines = []
    for s in summary:
        if not s["nonfinite_origins"] and not s["first_failures"]:
            continue
        lines.append(f"- **{s['variant']}**")
        origins = list(s["nonfinite_origins"].items())
        lines += [f"  - {n} non-finite step{'s' if n != 1 else ''}: {origin}" for origin, n in origins[:TOP_ORIGINS]]
        if len(origins) > TOP_ORIGINS:  # a run that NaNs on hundreds of steps breaks in dozens of places
            rest = sum(n for _, n in origins[TOP_ORIGINS:])
            lines.append(f"  - {rest} more in {len(origins) - TOP_ORIGINS} other places (--format json lists all)")
        lines += [f"  - first failure (seed {f['seed']}): {f['failure']}" for f in s["first_failures"]]
    return ["", "Where runs broke:", *lines] if lines else []


def render(summary: list[dict], fmt: str = "md") -> str:
    """The per-variant table as markdown, CSV, or the JSON contract."""
    if fmt == "json":
        return json.dumps(summary, indent=2, default=str)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["variant", "variant_spec", "runs", "steps"]
                        + [f"{k}_{part}" for k in _KEYS for part in ("mean", "std", "n")])
        for s in summary:
            writer.writerow([s["variant"], s["variant_spec"], s["runs"], s["steps"]]
                            + ["" if s[k][part] is None else s[k][part]
                               for k in _KEYS for part in ("mean", "std", "n")])
        return buffer.getvalue().rstrip("\n")
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r}; use md, csv or json")
    table = rows(summary)
    # a column with nothing in any row (eval losses of runs without an eval) is left out, and so are AMP
    # skips when no run had one (they exist only on CUDA with AMP on)
    amp = COLUMNS.index("AMP skips")
    keep = [i for i in range(len(COLUMNS)) if i < 4 or (any(s["amp_skips"]["mean"] for s in summary) if i == amp
                                                        else any(r[i] != "-" for r in table))]
    lines = markdown.table([COLUMNS[i] for i in keep], [[r[i] for i in keep] for r in table])
    return "\n".join(lines + provenance_lines(summary))


def survival(runs: list[Run], last: int | None = None) -> tuple[list[int], list[float]]:
    """Steps 0..``last`` (default the runs' last) and, per step, the share of ``runs`` with no NaN up to
    it: no non-finite loss and no update skipped for one (a NaN gradient of a finite loss, in the demo's
    runs). A run that ended cleanly before a step counts as free of NaN there."""
    def first_nan(run):
        steps = [s for s, loss, _ in run.curve if loss is None] + [run.counts.first_nan_step]
        return min((s for s in steps if s is not None), default=None)

    first = [first_nan(run) for run in runs]
    if last is None:
        last = max((run.curve[-1][0] for run in runs if run.curve), default=0)
    steps = list(range(last + 1))
    return steps, [sum(f is None or f > s for f in first) / len(runs) for s in steps]


def figure(runs: list[Run], right: str = "skips"):
    """The matplotlib Figure :func:`plot` saves (close it with ``matplotlib.pyplot.close``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_right) = plt.subplots(1, 2, figsize=(11, 4))
    colors: dict[str, str] = {}
    by_variant: dict[str, list] = {}
    for run in runs:
        if not run.curve:
            continue
        key = run.spec or run.variant
        first = key not in colors
        color = colors.setdefault(key, f"C{len(colors) % 10}")
        by_variant.setdefault(key, []).append(run)
        label = run.variant if first else None
        finite = [(s, loss) for s, loss, _ in run.curve if loss is not None]
        if finite:
            ax_loss.plot(*zip(*finite), color=color, lw=0.7, alpha=0.8, label=label)
        if right == "skips":
            total, cumulative = 0, []
            for _, _, skipped in run.curve:
                total += skipped
                cumulative.append(total)
            ax_right.plot([s for s, _, _ in run.curve], cumulative, color=color, lw=0.9, alpha=0.8, label=label)
    ax_loss.set(xlabel="step", ylabel="loss (finite steps only)", title="training loss", yscale="log")
    if right == "survival":
        last = max((run.curve[-1][0] for run in runs if run.curve), default=0)
        styles = ("-", "--", ":", "-.")  # variants that never fail share the line at 1: dashes keep each visible
        for i, (key, members) in enumerate(by_variant.items()):
            steps, alive = survival(members, last)
            ax_right.step(steps, alive, where="post", color=colors[key], lw=2.2 - 0.3 * (i % 4), ls=styles[i % 4],
                          label=f"{members[0].variant} ({len(members)} runs)")
        ax_right.set(xlabel="step", ylabel="share of runs", ylim=(-0.03, 1.03), title="runs still free of NaN")
    else:
        ax_right.set(xlabel="step", ylabel="skipped updates so far", title="cumulative skipped updates")
    if colors:
        ax_right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(runs: list[Run], path, right: str = "skips") -> Path:
    """Per variant (one colour): each seed's loss over finite steps as thin lines, and on the right
    either each seed's cumulative skipped updates (``"skips"``: the paper's Figure 2) or the share of
    the variant's runs still free of NaN at each step (``"survival"``)."""
    import matplotlib.pyplot as plt

    fig = figure(runs, right)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="vaepatch compare",
        description="NaN steps and skipped updates per variant (mean ± std over runs), from each run's "
                    "per-step events.jsonl; eval loss from the upstream's own log.")
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them (searched recursively)")
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md")
    parser.add_argument("--plot", metavar="FILE.png", help="loss curves and cumulative skipped updates per variant")
    parser.add_argument("--tensorboard", metavar="DIR", help="also write each run's steps as TensorBoard scalars, one "
                        f"folder per run under DIR laid out as under RUNS (needs: {_tensorboard.INSTALL})")
    args = parser.parse_args(argv)
    if args.tensorboard and not _tensorboard.available():
        parser.error(f"--tensorboard needs TensorBoard, which is not installed. run: {_tensorboard.INSTALL}")
    problems: list[str] = []
    runs = [load_run(p) for p in find_runs(args.runs, problems)]
    summary = summarize(runs)
    print(render(summary, args.format))
    if args.plot:
        print(f"figure: {plot(runs, args.plot)}", file=sys.stderr)
    if args.tensorboard:
        try:
            exported = _tensorboard.export_runs([r.path for r in runs], args.runs, args.tensorboard)
        except ValueError as e:
            print(f"vaepatch compare: {e}", file=sys.stderr)
            return 2
        print(f"tensorboard: {len(exported)} runs in {args.tensorboard} (tensorboard --logdir {args.tensorboard})",
              file=sys.stderr)
    for problem in problems + [p for s in summary for p in s["problems"]]:
        print(f"problem: {problem}", file=sys.stderr)
    return 0 if runs else 1
