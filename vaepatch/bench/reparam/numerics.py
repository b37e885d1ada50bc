"""`vaepatch bench numerics`: the paper's Table 1, measured on this machine.

Part 1: for sigma2 = 1 and equal means, the smallest integer log sigma1 at which
KL(N(0, sigma1) || N(0, 1)) is still finite, for three implementations:
NaiveExp (the textbook formula on sigma = exp(l), logs taken numerically), PyTorch's own
``torch.distributions`` KL (``0.5 * log(var ratio)``), and vaepatch's, in each dtype.

Part 2: for every parameterization, a sweep of the raw p over the dtype's whole finite
range: wherever the parameterization's outputs are finite and the float64 value of the
KL (and of its gradient) is representable in the dtype, vaepatch's KL and gradient must
be finite.  Failures are counted, not assumed away.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch.distributions import Normal, kl_divergence

from vaepatch import gaussian, scales

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Dehaene & Brossard, Table 1: smallest log sigma1 (and sigma1) with a finite KL.
PAPER = {
    ("float32", "naive_exp"): (-103, 1.85e-45),
    ("float32", "pytorch"): (-51, 7.10e-23),
    ("float16", "naive_exp"): (-17, 4.14e-08),
    ("float16", "pytorch"): (-8, 3.35e-04),
}

PARAMETERIZATIONS = ["naive_exp", "exp", "explin", "upbounded(1)", "downbounded", "bounded", "constant(1)",
                     "softplus(1)", "softclamp",
                     "softplus(log(2))", "bounded(0.01, 1)"]  # the last two: softplus-ln2, upbounded1-floor
# downbounded and bounded use the paper's pixel bounds on 0..1: alpha = 1/(256 sqrt 12), omega = 1.


def _naive_kl(l1, dtype):
    """The textbook KL on sigma = exp(l) with the logs taken numerically (NaiveExp)."""
    sigma1, sigma2 = torch.exp(l1), torch.ones((), dtype=dtype)
    return torch.log(sigma2) - torch.log(sigma1) + (sigma1 ** 2) / (2 * sigma2 ** 2) - 0.5


def _pytorch_kl(l1, dtype):
    zero = torch.zeros((), dtype=dtype)
    return kl_divergence(Normal(zero, torch.exp(l1), validate_args=False),
                         Normal(zero, torch.ones((), dtype=dtype), validate_args=False))


def _vaepatch_kl(l1, dtype):
    zero = torch.zeros((), dtype=dtype)
    return gaussian.kl(zero, l1, zero, zero)


IMPLEMENTATIONS = {"naive_exp": _naive_kl, "pytorch": _pytorch_kl, "vaepatch": _vaepatch_kl}


def _finite_with_grad(fn, l_value, dtype):
    l1 = torch.tensor(float(l_value), dtype=dtype, requires_grad=True)
    value = fn(l1, dtype)
    (grad,) = torch.autograd.grad(value, l1)
    return bool(torch.isfinite(value)), bool(torch.isfinite(grad))


def smallest_finite_log_scale(impl: str, dtype_name: str, lowest: int = -200):
    """Walk log sigma1 = 0, -1, -2, ... down to ``lowest``; return the last finite value and grad."""
    fn, dtype = IMPLEMENTATIONS[impl], DTYPES[dtype_name]
    last_value = last_grad = None
    value_ok = grad_ok = True
    for l in range(0, lowest - 1, -1):
        v, g = _finite_with_grad(fn, l, dtype)
        value_ok, grad_ok = value_ok and v, grad_ok and g
        if value_ok:
            last_value = l
        if grad_ok:
            last_grad = l
        if not value_ok and not grad_ok:
            break
    extreme = None
    if value_ok:  # finite over the whole walk: try the dtype's lowest finite log-scale too
        extreme = float(torch.finfo(dtype).min)
        extreme_ok = _finite_with_grad(fn, extreme, dtype)
        extreme = extreme if all(extreme_ok) else None
    sigma = math.exp(last_value) if last_value is not None else None  # e^l, as the paper prints it
    return {"implementation": impl, "dtype": dtype_name, "smallest_log_sigma": last_value, "sigma": sigma,
            "smallest_log_sigma_grad": last_grad, "finite_over_walk": value_ok, "finite_at_dtype_min": extreme}


def _grid(dtype, points):
    """Raw p values spanning the dtype's finite range, log-spaced on both sides of 0."""
    top = math.log10(float(torch.finfo(dtype).max))
    mags = torch.logspace(-4, top, points, dtype=torch.float64)
    mags[-1] = float(torch.finfo(dtype).max)
    grid = torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags])
    return grid.to(dtype).to(torch.float64).unique()  # the values the dtype can hold


# Four KLs per p, each its own graph (a shared graph would mix in 0 * inf from the others):
# p's scale on the q side or the p side, with equal or shifted means, against N(0, 1).
KL_CASES = {
    "q=N(0,s)": lambda l, z, o: gaussian.kl(z, l, z, z),
    "q=N(1,s)": lambda l, z, o: gaussian.kl(o, l, z, z),
    "p=N(0,s)": lambda l, z, o: gaussian.kl(z, z, z, l),
    "p=N(1,s)": lambda l, z, o: gaussian.kl(z, z, o, l),
}


def _kl_and_grad(case, param, values, dtype):
    """KL value and d KL / dp at each p (zero gradient where the scale ignores p)."""
    p = values.to(dtype, copy=True).requires_grad_(True)
    _, log_scale = scales.get(param)(p)
    value = KL_CASES[case](log_scale, torch.zeros_like(log_scale), torch.ones_like(log_scale))
    if not value.requires_grad:
        return value.detach(), torch.zeros_like(p)
    (grad,) = torch.autograd.grad(value.sum(), p)
    return value.detach(), grad


def sweep(param: str, dtype_name: str, points: int = 400):
    """Check finiteness of the KL and its gradient over the dtype's finite range of p."""
    dtype = DTYPES[dtype_name]
    limit = float(torch.finfo(dtype).max) / 4  # margin: a value near max may round up to inf
    grid = _grid(dtype, points)
    with torch.no_grad():
        scale, log_scale = scales.get(param)(grid.to(dtype))
    outputs_finite = torch.isfinite(scale) & torch.isfinite(log_scale)
    kl_checked = kl_bad = grad_checked = grad_bad = 0
    for case in KL_CASES:
        value, grad = _kl_and_grad(case, param, grid, dtype)
        ref_value, ref_grad = _kl_and_grad(case, param, grid, torch.float64)
        value_expected = outputs_finite & (ref_value.abs() < limit)
        grad_expected = value_expected & (ref_grad.abs() < limit)
        kl_checked += int(value_expected.sum())
        kl_bad += int((value_expected & ~torch.isfinite(value)).sum())
        grad_checked += int(grad_expected.sum())
        grad_bad += int((grad_expected & ~torch.isfinite(grad)).sum())
    finite_p = grid[outputs_finite]
    return {
        "scale": param, "dtype": dtype_name, "points": int(grid.numel()),
        "finite_output_range": [float(finite_p.min()), float(finite_p.max())] if finite_p.numel() else None,
        "kl_checked": kl_checked, "kl_nonfinite": kl_bad, "grad_checked": grad_checked, "grad_nonfinite": grad_bad,
    }


def _fmt_log(row):
    if row["finite_at_dtype_min"] is not None:
        return f"all finite (to {row['finite_at_dtype_min']:.3g})"
    if row["smallest_log_sigma"] is None:
        return "never"
    return f"{row['smallest_log_sigma']} / {row['sigma']:.3g}"


def table1(dtypes):
    rows = [smallest_finite_log_scale(impl, d) for d in dtypes for impl in IMPLEMENTATIONS]
    lines = ["Table 1 - smallest log sigma1 / sigma1 with a finite KL(N(0,sigma1) || N(0,1)), "
             "measured, beside the paper",
             f"{'dtype':9} {'implementation':15} {'measured (value)':28} {'grad finite to':16} {'paper':14}"]
    for r in rows:
        paper = PAPER.get((r["dtype"], r["implementation"]))
        paper_txt = (f"{paper[0]} / {paper[1]:.3g}" if paper
                     else ("all finite" if r["implementation"] == "vaepatch" else "-"))
        grad_txt = "all" if r["finite_at_dtype_min"] is not None else str(r["smallest_log_sigma_grad"])
        lines.append(f"{r['dtype']:9} {r['implementation']:15} {_fmt_log(r):28} {grad_txt:16} {paper_txt:14}")
    return rows, lines


def sweep_table(dtypes, points):
    rows = [sweep(p, d, points) for d in dtypes for p in PARAMETERIZATIONS]
    lines = ["vaepatch KL over each parameterization's whole finite output range "
             "(4 KLs per p: q/p side, equal/shifted means)",
             f"{'dtype':9} {'scale':22} {'finite-output p range':24} {'KL nonfinite':14} {'grad nonfinite':14}"]
    for r in rows:
        lo_hi = r["finite_output_range"]
        rng = f"[{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]" if lo_hi else "none"
        note = "  <- the failure mode, kept for comparison" if r["scale"] == "naive_exp" else ""
        lines.append(f"{r['dtype']:9} {r['scale']:22} {rng:24} "
                     f"{r['kl_nonfinite']:>4} / {r['kl_checked']:<7} "
                     f"{r['grad_nonfinite']:>4} / {r['grad_checked']:<7}{note}")
    return rows, lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vaepatch bench numerics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,float16,bfloat16",
                        help="comma-separated subset of float32,float16,bfloat16")
    parser.add_argument("--points", type=int, default=400, help="grid points per side of 0 in the range sweep")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; accepted: {', '.join(DTYPES)}")
    t1_rows, t1_lines = table1(dtypes)
    sw_rows, sw_lines = sweep_table(dtypes, args.points)
    failures = sum(r["kl_nonfinite"] + r["grad_nonfinite"] for r in sw_rows if r["scale"] != "naive_exp")
    if args.json:
        print(json.dumps({"table1": t1_rows, "sweep": sw_rows, "failures": failures}, indent=1))
    else:
        print("\n".join(t1_lines + [""] + sw_lines))
        print(f"\nvaepatch KL or gradient non-finite where the float64 value is representable "
              f"(all parameterizations but naive_exp): {failures}")
    return 0 if failures == 0 else 1
