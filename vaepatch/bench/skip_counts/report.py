"""The skip-counts bench's table (the paper's Table 4 shape, the paper's row beside ours) and figure
(its Figure 2 shape: cumulative skipped updates and NaN steps over training), from verdict records only."""
from __future__ import annotations

import json
from pathlib import Path

from vaepatch import markdown
from vaepatch.compare import mean_std
from vaepatch.bench import paper_tables
from vaepatch.runs import manifest as run_manifest

__all__ = ["summarize", "table_lines", "plot", "write"]

POLICY_WORDS = {"bind": "skip rule at the calibrated threshold", "off": "skip rule off (NaN steps still skipped)"}


def summarize(records: dict, policy: str, name: str, seeds: list) -> dict:
    """One row: runs recorded, high-gradient skips and NaN steps (mean ± std), stalls, failures by verdict,
    end NELBO (mean ± std over the runs that passed), share of steps applied (lowest run)."""
    runs = [records[(policy, name, s)] for s in seeds if (policy, name, s) in records]
    failures: dict = {}
    for r in runs:
        if not r["passed"]:
            failures[r["verdict"]] = failures.get(r["verdict"], 0) + 1
    return {"runs": len(runs), "of": len(seeds), "grad_skips": mean_std([r["grad_skips"] for r in runs]),
            "nan_steps": mean_std([r["nan_steps"] for r in runs]),
            "stalled": sum(r["verdict"] == "stalled" for r in runs), "failures": failures,
            "end_nelbo": mean_std([r["end_nelbo"] for r in runs if r["passed"]]),
            "applied_min": min((r["applied_share"] for r in runs if r["applied_share"] is not None), default=None),
            "wall_seconds": sum(r.get("wall_seconds") or 0 for r in runs)}


def _pm(stat: dict, digits: str = ".3g") -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:{digits}} ± {stat['std']:{digits}}" if stat["n"] > 1 else f"{stat['mean']:{digits}}"


def table_lines(records: dict, policy: str, names: list, seeds: list) -> list:
    """Table 4's columns for one policy, ours then the paper's (full-size CIFAR-10, ~940k steps)."""
    rows = []
    for name in names:
        s = summarize(records, policy, name, seeds)
        if not s["runs"]:
            rows.append([f"`{name}`", f"0 of {s['of']} (not run)", *["—"] * 6, *_paper(name)])
            continue
        failed = ", ".join(f"{k} {v}" for k, v in sorted(s["failures"].items())) or "none"
        end = _pm(s["end_nelbo"]) + (f" ({s['end_nelbo']['n']} passed)" if s["end_nelbo"]["n"] < s["runs"] else "")
        rows.append([f"`{name}`", f"{s['runs']} of {s['of']}", _pm(s["grad_skips"], ".3g"), _pm(s["nan_steps"], ".3g"),
                     str(s["stalled"]), failed, end,
                     "—" if s["applied_min"] is None else f"{s['applied_min']:.1%}", *_paper(name)])
    header = ["variant", "runs", "high-gradient skips", "NaN steps", "stalled", "failed (verdict)",
              "end NELBO (nats/dim)", "lowest share applied", "paper: skips", "paper: NaN",
              "paper: test NELBO (bits/dim)"]
    return markdown.table(header, rows)


def _paper(name: str) -> list:
    return list(paper_tables.TABLE4.get(name, ("not in the paper", "—", "—")))


def plot(records: dict, policies: list, names: list, seeds: list, steps: int, path: Path, title: str) -> None:
    """Per policy, two panels: cumulative high-gradient skips and cumulative NaN steps against the step,
    one line per run, one colour per variant (the paper's Figure 2 shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = matplotlib.colormaps["tab10"]
    fig, axes = plt.subplots(2, len(policies), figsize=(5.5 * len(policies), 6.4), squeeze=False, sharex=True)
    for col, policy in enumerate(policies):
        for row, (key, what) in enumerate((("grad_skip_steps", "high-gradient skips"), ("nan_step_list", "NaN steps"))):
            ax = axes[row][col]
            for i, name in enumerate(names):
                for j, seed in enumerate(seeds):
                    r = records.get((policy, name, seed))
                    if r is None:
                        continue
                    at = r[key]
                    end = max(r["steps"] - 1, at[-1] if at else 0)
                    xs, ys = [0] + [x for s in at for x in (s, s)] + [end], [0] + [y for k in range(len(at))
                                                                                    for y in (k, k + 1)] + [len(at)]
                    ax.plot(xs, ys, color=colours(i % 10), lw=1.2, alpha=0.85, label=name if j == 0 else None)
            ax.set_ylabel(f"cumulative {what}")
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
            ax.set_title(POLICY_WORDS.get(policy, policy) if row == 0 else "", fontsize=9)
            ax.set_xlim(0, steps)
            if row == 1:
                ax.set_xlabel("training step")
        axes[0][col].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, args, records: dict, calibration: dict | None, seconds: float) -> None:
    """skip_counts.md (also to stdout), skip_counts.json (the rows and the calibration; the per-run records
    stay in the records folder) and skip_counts.png."""
    machines, commits = [], []
    for r in records.values():
        for seen, value in ((machines, r.get("machine")), (commits, r.get("vaepatch_commit"))):
            if value is not None and value not in seen:
                seen.append(value)
    target = getattr(args, "target", "vdvae")
    upstream = "openai/vdvae" if target == "vdvae" else target
    title = (f"{upstream} tiny config, CPU, lr {args.lr:g}, {args.steps} steps, seeds "
             f"{','.join(map(str, args.seeds))}: updates skipped and NaN steps per variant")
    lines = [f"# {title}", ""]
    if calibration:
        lines += [f"Binding threshold: {calibration['threshold']:g} ({calibration['rule']}"
                  + (f"; that run's median gradient norm there {calibration['median_grad_norm']:.3g}, largest "
                     f"{calibration['max_grad_norm']:.3g}" if "median_grad_norm" in calibration else "") + ").", ""]
    for policy in args.policies:
        words = POLICY_WORDS[policy] if (policy, target) != ("off", "effvdvae") else \
            "skip rule off (optimizer.gradient_skip = False: NaN steps are applied too)"
        lines += [f"## {words}", ""] + table_lines(records, policy, args.names, args.seeds) + [""]
    lines += [f"Paper: {paper_tables.TABLE4_PROTOCOL}. End NELBO: the median of recon + KL over a run's last 10% "
              "of steps, training loss (nats/dim), over the runs that passed.", ""]
    out.mkdir(parents=True, exist_ok=True)
    rows = {p: {n: summarize(records, p, n, args.seeds) for n in args.names} for p in args.policies}
    meta = dict(target=target, lr=args.lr, steps=args.steps, seeds=args.seeds, variants=args.names,
                policies=args.policies, stall_steps=args.stall_steps, extra=args.extra, calibration=calibration,
                machines=machines, vaepatch_commits=commits, runs=len(records),
                runs_wall_seconds=sum(r.get("wall_seconds") or 0 for r in records.values()), wall_seconds=seconds,
                report_only=args.report_only)
    run_manifest.write_atomic(out / "skip_counts.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    run_manifest.write_atomic(out / "skip_counts.md", "\n".join(lines) + "\n")
    plot(records, args.policies, args.names, args.seeds, args.steps, out / "skip_counts.png", title)
    print("\n".join(lines))
    print(f"wrote {out / 'skip_counts.json'}, {out / 'skip_counts.md'}, {out / 'skip_counts.png'} ({seconds:.0f} s)")
