"""Scale parameterizations: a raw network output p -> (scale, log_scale).

Dehaene & Brossard, "Re-parameterizing VAEs for stability": the scale of a Normal
should come from a map whose log is known in closed form, so the KL never takes
``log(exp(p))`` (which underflows to -inf) or a log of a ratio of scales.

Every parameterization here returns ``(scale, log_scale)`` with ``log_scale``
computed analytically.  Piecewise forms evaluate each branch on a clipped copy of
p (``p_neg = min(p, 0)``, ``p_pos = p - p_neg``, so the gradient flows through
exactly one branch), so no branch ever produces
``inf * 0`` (paper, section 5).

>>> from vaepatch import scales
>>> scale, log_scale = scales.get("upbounded1")(torch.tensor([-200.0, 0.0, 50.0]))
"""
from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The paper's pixel bounds on the 0..1 scale: quantization noise std of 8-bit data.
PIXEL_ALPHA = 1.0 / (256.0 * math.sqrt(12.0))


def _split(p):
    """(min(p, 0), max(p, 0)) whose gradients sum to exactly 1 everywhere, p == 0 included.

    clamp passes the gradient at its boundary, so the positive part is p - min(p, 0)
    rather than a second clamp (two clamps would both pass it at p == 0: gradient 2).
    """
    neg = torch.clamp(p, max=0.0)
    return neg, p - neg


def _naive_exp(p):
    scale = torch.exp(p)
    return scale, torch.log(scale)  # the upstream failure mode, on purpose


def _exp(p):
    return torch.exp(p), p


def _explin(p):
    n, q = _split(p)
    return torch.exp(n) + q, n + torch.log1p(q)


def _upbounded(p, omega):
    n, q = _split(p)
    m = -torch.expm1(-q)  # 1 - exp(-p+) in [0, 1), accurate near 0
    half = omega / 2.0
    return half * (torch.exp(n) + m), (n + torch.log1p(m)) + math.log(half)


def _downbounded(p, alpha):
    log_alpha = math.log(alpha)
    log_scale = log_alpha + F.softplus(p - log_alpha)  # logaddexp(log alpha, p)
    return alpha + torch.exp(p), log_scale


def _bounded(p, alpha, omega):
    log_alpha, log_width = math.log(alpha), math.log(omega - alpha)
    # log(alpha + (omega - alpha) * sigmoid(p)) = logaddexp(log alpha, log(omega-alpha) + logsigmoid(p))
    t = log_width + F.logsigmoid(p) - log_alpha
    log_scale = log_alpha + F.softplus(t)
    return alpha + (omega - alpha) * torch.sigmoid(p), log_scale


def _constant(p, c):
    return torch.full_like(p, c), torch.full_like(p, math.log(c))


def _log_softplus(x):
    """log(softplus(x)) without underflow: below -8 it is x - exp(x)/2 to O(exp(2x))."""
    far = x < -8
    zero = torch.zeros_like(x)
    x_far = torch.where(far, x, zero)  # each branch sees only inputs where it is safe
    x_near = torch.where(far, zero, x)
    return torch.where(far, x_far - 0.5 * torch.exp(x_far), torch.log(F.softplus(x_near)))


def _softplus(p, beta):
    return F.softplus(beta * p) / beta, _log_softplus(beta * p) - math.log(beta)


def _softclamp(p):
    # NVAE's own: sigma = exp(5 tanh(p / 5)) + 0.01
    c = 5.0 * torch.tanh(p / 5.0)
    log_eps = math.log(0.01)
    return torch.exp(c) + 0.01, log_eps + F.softplus(c - log_eps)


@dataclass(frozen=True)
class Scale:
    """A named parameterization; call it on a raw tensor to get ``(scale, log_scale)``."""

    name: str
    args: tuple = ()
    description: str = field(default="", compare=False)

    @property
    def spec(self) -> str:
        """Canonical spec string that ``get`` parses back to an equal object."""
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(_fmt(a) for a in self.args)})"

    def __call__(self, p: torch.Tensor):
        if p.dtype in _HALF and self.name != "naive_exp":
            # In 16-bit, the chain rule through these compositions overflows in intermediates
            # (e.g. g / softplus(x) before * sigmoid(x)) even when the true gradient is small.
            # The elementwise math is cheap, so do it in float32 and hand back p's dtype.
            # naive_exp stays in p's dtype: it exists to reproduce the 16-bit failure.
            scale, log_scale = _FUNCTIONS[self.name](p.float(), *self.args)
            return scale.to(p.dtype), log_scale.to(p.dtype)
        return _FUNCTIONS[self.name](p, *self.args)

    def __str__(self):
        return self.spec


def _fmt(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


_HALF = (torch.float16, torch.bfloat16)

_FUNCTIONS = {
    "naive_exp": _naive_exp,
    "exp": _exp,
    "explin": _explin,
    "upbounded": _upbounded,
    "downbounded": _downbounded,
    "bounded": _bounded,
    "constant": _constant,
    "softplus": _softplus,
    "softclamp": _softclamp,
}

# name -> (parameter names, defaults, one-line description)
_SIGNATURES = {
    "naive_exp": ((), (), "exp(p), log taken numerically: the upstream failure mode, for comparison only"),
    "exp": ((), (), "exp(p), log sigma = p exactly"),
    "explin": ((), (), "exp(p) for p <= 0, p + 1 above: no overflow, linear growth"),
    "upbounded": (("omega",), (1.0,), "omega/2 exp(p) for p <= 0, omega/2 (2 - exp(-p)) above: sigma < omega"),
    "downbounded": (("alpha",), (PIXEL_ALPHA,), "alpha + exp(p): sigma > alpha"),
    "bounded": (("alpha", "omega"), (PIXEL_ALPHA, 1.0), "alpha + (omega - alpha) sigmoid(p): alpha < sigma < omega"),
    "constant": (("c",), (1.0,), "sigma = c, p ignored (the paper's Cst priors)"),
    "softplus": (("beta",), (1.0,), "softplus(beta p) / beta (Efficient-VDVAE's gradient smoothing)"),
    "softclamp": ((), (), "exp(5 tanh(p / 5)) + 0.01 (NVAE's own)"),
}

_ALIASES = {"cst": "constant", "const": "constant", "naiveexp": "naive_exp", "exp_lin": "explin"}

ACCEPTED = (
    "naive_exp, exp, explin, upbounded(omega>0), downbounded(alpha>0), bounded(alpha, omega) "
    "with 0<alpha<omega, constant(c>0), softplus(beta>0), softclamp; short forms: upbounded1 = "
    "upbounded(1), cst1 = constant(1), downbounded0.01, softplus2, ...; numbers may be expressions "
    "like 1/(256*sqrt(12))"
)


def names():
    """Parameterization names with one-line descriptions."""
    return {n: sig[2] for n, sig in _SIGNATURES.items()}


_SPEC = re.compile(r"^\s*([A-Za-z_]+?)\s*(?:\((.*)\)|([0-9][0-9.eE+-]*))?\s*$")


def get(spec) -> Scale:
    """Parse a spec such as ``"upbounded(1)"``, ``"upbounded1"``, ``"cst1"`` or ``"bounded(0.001, 1)"``."""
    if isinstance(spec, Scale):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"scale spec must be a string, got {type(spec).__name__} {spec!r}; accepted: {ACCEPTED}")
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(f"malformed scale spec {spec!r}; accepted: {ACCEPTED}")
    raw_name, inner, short = m.groups()
    name = raw_name.lower()
    name = _ALIASES.get(name, name)
    if name not in _SIGNATURES:
        raise ValueError(f"unknown scale parameterization {raw_name!r} in {spec!r}; accepted: {ACCEPTED}")
    params, defaults, description = _SIGNATURES[name]
    if inner is not None and inner.strip():
        values = [_number(v, spec) for v in inner.split(",")]
    elif short is not None:
        values = [_number(short, spec)]
    else:
        values = []
    if len(values) > len(params):
        raise ValueError(f"{name} takes {len(params)} parameter(s) ({', '.join(params) or 'none'}), got {len(values)} in {spec!r}; accepted: {ACCEPTED}")
    values = tuple(values) + tuple(defaults[len(values):])
    _check_range(name, dict(zip(params, values)), spec)
    return Scale(name, tuple(float(v) for v in values), description)


def _check_range(name, values, spec):
    def bad(what):
        raise ValueError(f"{spec!r}: {what}; accepted: {ACCEPTED}")

    for key, v in values.items():
        if not math.isfinite(v) or v <= 0:
            bad(f"{key} must be a finite number > 0, got {v}")
    if name == "bounded" and values["alpha"] >= values["omega"]:
        bad(f"bounded needs alpha < omega, got alpha={values['alpha']} >= omega={values['omega']}")


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.Pow: operator.pow}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp}


def _number(text, spec):
    """Evaluate a small arithmetic expression (numbers, + - * / **, sqrt/log/exp) without eval."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and len(node.args) == 1:
            return _FUNCS[node.func.id](ev(node.args[0]))
        raise ValueError

    try:
        return ev(ast.parse(text.strip(), mode="eval").body)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError):
        raise ValueError(f"cannot read number {text.strip()!r} in scale spec {spec!r}; accepted: {ACCEPTED}") from None
