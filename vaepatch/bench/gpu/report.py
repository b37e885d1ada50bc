"""The GPU check's report as Markdown: one table per section (its state is ``state``)."""
from __future__ import annotations

from vaepatch.markdown import table

__all__ = ["PAPER_OU_EPOCH_RATIO", "render_markdown"]

PAPER_OU_EPOCH_RATIO = 1.095  # Pervez & Gavves: 4.6 s vs 4.2 s per epoch (OU-VAE vs VAE), GPU
# -- Markdown ----------------------------------------------------------------------------------
def _number(spec: str, scale: float = 1.0):
    return lambda value: "—" if value is None else f"{scale * value:{spec}}"


_ms, _mib, _x = _number(".1f", 1e3), _number(".1f", 2**-20), _number(".3f")  # seconds as ms, bytes as MiB, ratios


def _memory_label(result) -> str:
    return ("peak MiB during a step (torch.cuda.max_memory_allocated, reset per config)"
            if result.get("device") == "cuda"
            else "saved MiB (CPU has no allocator statistics: activation bytes autograd saves for backward)")


def _preflight_md(r) -> list:
    lines = [f"- device: **{r.get('gpu') or r.get('device')}**"
             + (f", {r['gpu_memory_gib']:.0f} GiB, compute capability {r['capability']}" if r.get("gpu") else ""),
             f"- python {r.get('python')}, torch {r.get('torch')} (CUDA {r.get('torch_cuda')}, "
             f"cuDNN {r.get('cudnn')}), triton {r.get('versions', {}).get('triton')}, "
             f"TF32 matmul {r.get('tf32_matmul')} / cuDNN {r.get('tf32_cudnn')}",
             f"- nvidia-smi: {r.get('nvidia_smi') or '—'}",
             f"- git: {r.get('git') or 'missing'}; mpiexec: {r.get('mpiexec') or 'missing'}; "
             f"MPI: {r.get('mpi') or '—'}",
             "- clones: " + "; ".join(f"{k}: {v}" for k, v in r.get("clones", {}).items())]
    lines += [f"- problem: {p}" for p in r.get("problems", [])]
    return lines


def _vdvae_md(r) -> list:
    rows = []
    for row in r.get("rows", []):
        if row.get("error"):
            rows.append([row.get("variant"), "fused" if row.get("fuse") else "eager",
                         "—", "—", "—", "—", "—", "—", "error: " + row["error"][:200]])
            continue
        mem = row.get("memory", {})
        key = "peak_bytes" if "peak_bytes" in mem.get("vanilla", {}) else "saved_bytes"
        mv, mp = mem.get("vanilla", {}).get(key), mem.get("patched", {}).get(key)
        rows.append([row["variant"], "fused" if row["fuse"] else "eager", _ms(row["vanilla_s"]), _ms(row["patched_s"]),
                     _x(row["ratio"]), _mib(mv), _mib(mp), _x(mp / mv if mv and mp else None),
                     "; ".join(row.get("warnings", [])[:2])[:200]])
    size = "full width (384)" if r.get("size") == "cifar10" else "tiny (width 32, one block per resolution)"
    head = [f"openai/vdvae `--hps cifar10`, {size}, batch {r.get('batch')}, {r.get('device')}: median of "
            f"{r.get('steps')} interleaved steps after {r.get('warmup')} warm-up; memory = {_memory_label(r)}", ""]
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
    head = [f"NVAE {r.get('model')} model, batch {r.get('batch')}, lr {r.get('lr')} (no warm-up), "
            f"{r.get('steps')} steps per variant on {r.get('device')} "
            f"({'fp16 autocast + GradScaler, as NVAE trains' if r.get('device') == 'cuda' else 'CPU: AMP off'}); "
            "counts from events.jsonl; step time = median event time after "
            f"{r.get('warmup')} steps, runs one after another (not interleaved)", ""]
    return head + table(["variant", "steps", "amp skips", "nan steps", "skipped", "first NaN", "median ms",
                         "time ratio", "last loss", "check"], rows)


def _launcher_md(r) -> list:
    rows = []
    for name, row in r.get("runs", {}).items():
        rows.append([name, row.get("command_head"), row.get("status"), row.get("device"),
                     f"{row.get('events')}/{r.get('steps')}", row.get("nan_steps"), row.get("amp_skips"),
                     row.get("grad_skips"), ", ".join(row.get("compat") or []),
                     "ok" if row.get("ok") else "; ".join(row.get("problems", []) + [row.get("error") or ""])[:300]])
    return table(["run", "launched as", "run.json status", "device", "events/steps", "nan", "amp", "grad",
                  "compat shims", "check"], rows)


def _ou_md(r) -> list:
    rows = []
    for row in r.get("rows", []):
        if row.get("error"):
            rows.append([row.get("reference"), "—", "—", "—", "—", "—", "—",
                         "error: " + row["error"][:200]])
            continue
        rows.append([row["reference"], row["config"], _ms(row["seconds"]), _x(row.get("time_ratio")),
                     _mib(row.get("memory_bytes")), _x(row.get("memory_ratio")), _x(row.get("flop_ratio")),
                     f"×{PAPER_OU_EPOCH_RATIO} per epoch" if row.get("samples") else ""])
    head = [f"OU ρ = {r.get('rho')}, K = {r.get('samples')} vs plain, {r.get('device')}: median of {r.get('steps')} "
            f"interleaved steps after {r.get('warmup')} warm-up; memory = {_memory_label(r)}", ""]
    return head + table(["reference", "config", "ms/step", "time ×", "mem MiB", "mem ×", "FLOP ×", "paper"], rows)


RENDERERS = {"preflight": _preflight_md, "vdvae-step-time": _vdvae_md, "nvae-amp": _nvae_md, "launcher": _launcher_md,
             "ou-cost": _ou_md}


def render_markdown(report: dict) -> str:
    sections = report.get("sections", {})
    pre = sections.get("preflight", {}).get("result") or {}
    lines = [f"# vaepatch GPU check{' (dry run)' if report.get('dry_run') else ''}", "",
             f"{pre.get('gpu') or pre.get('device') or 'device unknown'}; started {report.get('started')}, "
             f"updated {report.get('updated')}, {report.get('elapsed_s', 0):.0f} s of "
             f"--budget-s {report.get('budget_s')}"
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
