"""The decoder-variance bench's table and figure: our runs per cell beside the paper's Table 3."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from vaepatch import scales
from vaepatch.bench import paper_tables

__all__ = ["summarize", "row_line", "table_lines", "label", "plot"]


def _range(epochs: list) -> str:
    if not epochs:
        return ""
    lo, hi = min(epochs), max(epochs)
    return f" ({lo})" if lo == hi else f" ({lo}-{hi})"


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (mu, scale, lr): NaN runs, degenerate runs (finite but failed), runs whose training
    loss went below the bounded floor, and the test bits/dim of the sound runs."""
    cells: dict = {}
    for r in runs:
        cells.setdefault((r["mu"], r["scale"], r["lr"]), []).append(r)
    rows = []
    for (mu, scale, lr), rs in cells.items():
        nan = [r["fail_epoch"] for r in rs if r["failure"] == "nan"]
        degenerate = [r["fail_epoch"] for r in rs if r["failure"] == "degenerate"]
        floor = [r["below_floor_epoch"] for r in rs if r["below_floor_epoch"] is not None]
        sound = [r for r in rs if not r["failed"]]
        bpd = [r["test_bpd"] for r in sound if r["test_bpd"] is not None]
        rows.append({"mu": mu, "scale": scale, "lr": lr, "seeds": len(rs), "nan": len(nan), "nan_epochs": nan,
                     "degenerate": len(degenerate), "degenerate_epochs": degenerate,
                     "below_floor": len(floor), "below_floor_epochs": floor,
                     "failed": len(nan) + len(degenerate), "sound": len(sound),
                     "test_nonfinite": len(sound) - len(bpd),
                     "test_bpd_mean": statistics.fmean(bpd) if bpd else None,
                     "test_bpd_std": statistics.stdev(bpd) if len(bpd) > 1 else None,
                     "best_epochs": [r["best_epoch"] for r in sound],
                     "paper": paper_tables.table3(scale, mu)})
    return rows


def label(spec: str) -> str:
    """A scale spec with the pixel bound written as alpha, for tables and plots."""
    return spec.replace(repr(scales.PIXEL_ALPHA), "α")


def _bpd_text(row) -> str:
    if row["test_bpd_mean"] is None:
        text = "-"
    else:
        text = f"{row['test_bpd_mean']:.2f}"
        if row["test_bpd_std"] is not None:
            text += f" ± {row['test_bpd_std']:.2f}"
        text += f" (n={row['sound'] - row['test_nonfinite']})"
    if row["test_nonfinite"]:
        text += f", {row['test_nonfinite']} non-finite at test"
    return text


def row_line(row: dict) -> str:
    n = row["seeds"]
    return (f"| {row['mu']} | {label(row['scale'])} | {row['lr']:g} | {row['nan']}/{n}{_range(row['nan_epochs'])} | "
            f"{row['degenerate']}/{n}{_range(row['degenerate_epochs'])} | "
            f"{row['below_floor']}/{n}{_range(row['below_floor_epochs'])} | {_bpd_text(row)} | {row['paper'] or '-'} |")


def table_lines(rows: list[dict]) -> list[str]:
    """A markdown table, the same text on stdout and in decoder_variance.md."""
    return (["| mu | decoded scale | lr | NaN runs (epoch) | degenerate runs (epoch) | loss below the "
             "bounded floor (epoch) | test bits/dim, sound runs | paper, test bits/dim |",
             "|---|---|---|---|---|---|---|---|"] + [row_line(row) for row in rows]
            + ["", f"α = 1/(256·√12) = {scales.PIXEL_ALPHA:.6g}. NaN: training loss non-finite (run stopped). "
               "Degenerate: finite, but a decoded log γ fell below log(float32 tiny) = -87.3 (counted once: a "
               "degenerate run that later turns NaN is a NaN run). Bounded floor: mean training loss below "
               "784 (log α + ½ log 2π), the least a model with γ ≥ α can reach (not a failure). Test bits/dim: "
               "mean ± sd over the sound runs, each tested at its best validation epoch.",
               f"paper: Dehaene & Brossard Table 3 ({paper_tables.TABLE3_PROTOCOL})"])


def plot(runs: list[dict], path: Path, underflow: float) -> None:
    """The smallest decoded log γ of each epoch, one line per run, one panel per (mu, lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["mu"], r["lr"]) for r in runs))
    specs = list(dict.fromkeys(r["scale"] for r in runs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4), squeeze=False, sharey=True)
    for ax, (mu, lr) in zip(axes[0], panels):
        for r in runs:
            if (r["mu"], r["lr"]) != (mu, lr) or not r["min_log_scale"]:
                continue
            i = specs.index(r["scale"])
            epochs = np.arange(1, len(r["min_log_scale"]) + 1)
            ax.plot(epochs, r["min_log_scale"], color=colors[i % len(colors)], lw=1,
                    label=label(r["scale"]) if r["seed"] == min(q["seed"] for q in runs) else None)
            if r["failure"] == "nan":
                ax.plot(r["fail_epoch"] - 1, r["min_log_scale"][-1], "x", color=colors[i % len(colors)])
        ax.axhline(underflow, color="k", ls="--", lw=1, label="float32 exp underflow")
        ax.axhline(math.log(scales.PIXEL_ALPHA), color="gray", ls=":", lw=1, label="log α")
        ax.set_yscale("symlog", linthresh=10)
        ax.set(title=f"mu {mu}, lr {lr:g}", xlabel="epoch")
    axes[0, 0].set_ylabel("smallest decoded log γ in the epoch")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
