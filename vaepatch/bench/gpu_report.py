"""The GPU check's record: the time budget, the atomic JSON + Markdown writer, and the Markdown tables.

Nothing here needs torch, a clone or a GPU: the orchestrator (``vaepatch.bench.gpu``) and the
sections (``vaepatch.bench.gpu_sections``) both write through :func:`write_atomic`, so a run killed at
any moment leaves the last complete file, never half of one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from vaepatch.markdown import table
from vaepatch.runs.events import strict
from vaepatch.runs.manifest import write_atomic  # the report and sections write through it

__all__ = ["SCHEMA", "PAPER_OU_EPOCH_RATIO", "write_atomic", "read_json", "Budget", "render_markdown", "section_status"]

SCHEMA = "vaepatch-gpu-check/1"
PAPER_OU_EPOCH_RATIO = 1.095  # Pervez & Gavves: 4.6 s vs 4.2 s per epoch (OU-VAE vs VAE), GPU
STATUSES = ("ok", "failed", "error", "timeout", "skipped", "running", "pending")


def dumps(obj) -> str:
    """Strict JSON, like events.jsonl: non-finite floats become null."""
    return json.dumps(strict(obj), indent=1, default=str, allow_nan=False) + "\n"


def read_json(path) -> dict | None:
    """The JSON object at ``path``, or None if it is missing or not (yet) whole."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Budget:
    """A wall-clock budget for the whole check: what is left, and how much of it a section may take.

    ``allot(cap_s, min_s)``: the seconds a section gets, ``min(cap_s, left - reserve_s)``, or None with
    the reason when that is under ``min_s`` (the section would not finish anything worth keeping).
    ``reserve_s`` is kept back for writing the report after the last section.
    """

    def __init__(self, total_s: float, reserve_s: float = 5.0, clock=time.monotonic):
        self.total_s, self.reserve_s, self.clock = float(total_s), float(reserve_s), clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def allot(self, cap_s: float, min_s: float) -> tuple[float | None, str]:
        usable = self.left() - self.reserve_s
        if usable < min_s:
            return None, (f"skipped: needs at least {min_s:.0f} s, {max(usable, 0):.0f} s left of --budget-s "
                          f"{self.total_s:.0f}")
        return min(cap_s, usable), ""


def section_status(rows_ok: bool, error: str | None = None) -> str:
    return "error" if error else ("ok" if rows_ok else "failed")


# -- Markdown ----------------------------------------------------------------------------------
def _number(spec: str, scale: float = 1.0):
    return lambda value: "—" if value is None else f"{scale * value:{spec}}"


_ms, _mib, _x = _number(".1f", 1e3), _number(".1f", 2**-20), _number(".3f")  # seconds as ms, bytes as MiB, ratios


def _memory_label(result) -> str:
    return ("peak MiB during a step (torch.cuda.max_memory_allocated, reset per config)" if result.get("device") == "cuda"
            else "saved MiB (CPU has no allocator statistics: activation bytes autograd saves for backward)")


def _preflight_md(r) -> list:
    lines = [f"- device: **{r.get('gpu') or r.get('device')}**" + (f", {r['gpu_memory_gib']:.0f} GiB, compute capability "
                                                                    f"{r['capability']}" if r.get("gpu") else ""),
             f"- python {r.get('python')}, torch {r.get('torch')} (CUDA {r.get('torch_cuda')}, cuDNN {r.get('cudnn')}), "
             f"triton {r.get('versions', {}).get('triton')}, TF32 matmul {r.get('tf32_matmul')} / cuDNN {r.get('tf32_cudnn')}",
             f"- nvidia-smi: {r.get('nvidia_smi') or '—'}",
             f"- git: {r.get('git') or 'missing'}; mpiexec: {r.get('mpiexec') or 'missing'}; MPI: {r.get('mpi') or '—'}",
             "- clones: " + "; ".join(f"{k}: {v}" for k, v in r.get("clones", {}).items())]
    lines += [f"- problem: {p}" for p in r.get("problems", [])]
    return lines


def _vdvae_md(r) -> list:
    rows = []
    for row in r.get("rows", []):
        if row.get("error"):
            rows.append([row.get("variant"), "fused" if row.get("fuse") else "eager", "—", "—", "—", "—", "—", "—",
                         "error: " + row["error"][:200]])
            continue
        mem = row.get("memory", {})
        key = "peak_bytes" if "peak_bytes" in mem.get("vanilla", {}) else "saved_bytes"
        mv, mp = mem.get("vanilla", {}).get(key), mem.get("patched", {}).get(key)
        rows.append([row["variant"], "fused" if row["fuse"] else "eager", _ms(row["vanilla_s"]), _ms(row["patched_s"]),
                     _x(row["ratio"]), _mib(mv), _mib(mp), _x(mp / mv if mv and mp else None),
                     "; ".join(row.get("warnings", [])[:2])[:200]])
    size = "full width (384)" if r.get("size") == "cifar10" else "tiny (width 32, one block per resolution)"
    head = [f"openai/vdvae `--hps cifar10`, {size}, batch {r.get('batch')}, {r.get('device')}: median of {r.get('steps')} "
            f"interleaved steps after {r.get('warmup')} warm-up; memory = {_memory_label(r)}", ""]
    fused = [f"{v}: patched/vanilla {_x(s['eager_ratio'])} eager, {_x(s['fused_ratio'])} fused; fused patched step "
             f"{_x(s['fused_over_eager_patched'])} x the eager one" for v, s in r.get("fuse_summary", {}).items()]
    return head + table(["variant", "block math", "vanilla ms", "patched ms", "ratio", "vanilla mem MiB",
                         "patched mem MiB", "mem ratio", "notes"], rows) + ([""] + [f"- {line}" for line in fused])


def _nvae_md(r) -> list:
    rows = [[row.get("variant"), row.get("steps"), row.get("amp_skips"), row.get("nan_steps"), row.get("skipped"),
             row.get("first_nan_step"), _ms(row.get("median_step_s")), _x(row.get("time_ratio")),
             row.get("last_loss") if row.get("last_loss") is None else f"{row['last_loss']:.4g}",
             "ok" if row.get("ok") else "; ".join(row.get("problems", []) + [row.get("error") or ""])[:200]]
            for row in r.get("rows", [])]
    head = [f"NVAE {r.get('model')} model, batch {r.get('batch')}, lr {r.get('lr')} (no warm-up), {r.get('steps')} steps "
            f"per variant on {r.get('device')} ({'fp16 autocast + GradScaler, as NVAE trains' if r.get('device') == 'cuda' else 'CPU: AMP off'}); "
            "counts from events.jsonl; step time = median event time after "
            f"{r.get('warmup')} steps, runs one after another (not interleaved)", ""]
    return head + table(["variant", "steps", "amp skips", "nan steps", "skipped", "first NaN", "median ms",
                         "time ratio", "last loss", "check"], rows)


def _launcher_md(r) -> list:
    rows = []
    for name, row in r.get("runs", {}).items():
        rows.append([name, row.get("command_head"), row.get("status"), row.get("device"), f"{row.get('events')}/{r.get('steps')}",
                     row.get("nan_steps"), row.get("amp_skips"), row.get("grad_skips"), ", ".join(row.get("compat") or []),
                     "ok" if row.get("ok") else "; ".join(row.get("problems", []) + [row.get("error") or ""])[:300]])
    return table(["run", "launched as", "run.json status", "device", "events/steps", "nan", "amp", "grad", "compat shims",
                  "check"], rows)


def _ou_md(r) -> list:
    rows = []
    for row in r.get("rows", []):
        if row.get("error"):
            rows.append([row.get("reference"), "—", "—", "—", "—", "—", "—", "error: " + row["error"][:200]])
            continue
        rows.append([row["reference"], row["config"], _ms(row["seconds"]), _x(row.get("time_ratio")),
                     _mib(row.get("memory_bytes")), _x(row.get("memory_ratio")), _x(row.get("flop_ratio")),
                     f"×{PAPER_OU_EPOCH_RATIO} per epoch" if row.get("samples") else ""])
    head = [f"OU ρ = {r.get('rho')}, K = {r.get('samples')} vs plain, {r.get('device')}: median of {r.get('steps')} interleaved "
            f"steps after {r.get('warmup')} warm-up; memory = {_memory_label(r)}", ""]
    return head + table(["reference", "config", "ms/step", "time ×", "mem MiB", "mem ×", "FLOP ×", "paper"], rows)


RENDERERS = {"preflight": _preflight_md, "vdvae-step-time": _vdvae_md, "nvae-amp": _nvae_md, "launcher": _launcher_md,
             "ou-cost": _ou_md}


def render_markdown(report: dict) -> str:
    sections = report.get("sections", {})
    pre = sections.get("preflight", {}).get("result") or {}
    lines = [f"# vaepatch GPU check{' (dry run)' if report.get('dry_run') else ''}", "",
             f"{pre.get('gpu') or pre.get('device') or 'device unknown'}; started {report.get('started')}, "
             f"updated {report.get('updated')}, {report.get('elapsed_s', 0):.0f} s of --budget-s {report.get('budget_s')}"
             f"{'' if report.get('finished') else ' (still running, or cut short: what is here was measured)'}", "",
             *table(["section", "status", "seconds", "note"],
                    [[name, s.get("status"), f"{s['seconds']:.0f}" if s.get("seconds") is not None else None,
                      (s.get("error") or s.get("note") or "")[:300]] for name, s in sections.items()])]
    for name, section in sections.items():
        result = section.get("result")
        if not result or name not in RENDERERS:
            continue
        lines += ["", f"## {name}", ""]
        try:
            lines += RENDERERS[name](result)
        except Exception as err:  # noqa: BLE001 - a malformed partial result must not lose the rest of the report
            lines.append(f"(could not render: {type(err).__name__}: {err})")
    return "\n".join(lines) + "\n"
