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
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vaepatch.precision import float32_math

# The paper's pixel bounds on the 0..1 scale: quantization noise std of 8-bit data.
PIXEL_ALPHA = 1.0 / (256.0 * math.sqrt(12.0))


@dataclass(frozen=True)
class _Entry:
    """One registered parameterization: the function, its parameters and how to describe it."""

    function: Callable  # (p, *params) -> (scale, log_scale), 16-bit rule applied
    params: tuple = ()
    defaults: tuple = ()
    description: str = ""
    accepted: str = ""  # how error messages spell it, e.g. "upbounded(omega>0)"
    check: Optional[Callable] = None  # extra rule on the parameters: returns a problem or None


_REGISTRY: dict = {}


def register(name: str, *, params: dict | None = None, description: str, rule: str = "", check=None,
             float32: bool = True):
    """Register ``fn(p, *params) -> (scale, log_scale)`` under ``name``: the one place a parameterization
    is declared. ``params`` maps parameter names to defaults (each must be a finite number > 0);
    ``rule`` spells an extra constraint checked by ``check(values) -> problem or None``."""
    params = dict(params or {})

    def decorate(fn):
        accepted = name if not params else f"{name}({', '.join(params)})" if rule else \
            f"{name}({', '.join(f'{p}>0' for p in params)})"
        function = float32_math(fn) if float32 else fn
        _REGISTRY[name] = _Entry(function, tuple(params), tuple(params.values()), description,
                                 accepted + (f" with {rule}" if rule else ""), check)
        return fn

    return decorate


def _split(p):
    """(min(p, 0), max(p, 0)) whose gradients sum to exactly 1 everywhere, p == 0 included.

    clamp passes the gradient at its boundary, so the positive part is p - min(p, 0)
    rather than a second clamp (two clamps would both pass it at p == 0: gradient 2).
    """
    neg = torch.clamp(p, max=0.0)
    return neg, p - neg


@register("naive_exp", description="exp(p), log taken numerically: the upstream failure mode, for comparison only",
          float32=False)  # stays in p's dtype: it exists to reproduce the 16-bit failure
def _naive_exp(p):
    scale = torch.exp(p)
    return scale, torch.log(scale)  # the upstream failure mode, on purpose


@register("exp", description="exp(p), log sigma = p exactly")
def _exp(p):
    return torch.exp(p), p


@register("explin", description="exp(p) for p <= 0, p + 1 above: no overflow, linear growth")
def _explin(p):
    n, q = _split(p)
    return torch.exp(n) + q, n + torch.log1p(q)


@register("upbounded", params={"omega": 1.0},
          description="omega/2 exp(p) for p <= 0, omega/2 (2 - exp(-p)) above: sigma < omega")
def _upbounded(p, omega):
    n, q = _split(p)
    m = -torch.expm1(-q)  # 1 - exp(-p+) in [0, 1), accurate near 0
    half = omega / 2.0
    return half * (torch.exp(n) + m), (n + torch.log1p(m)) + math.log(half)


@register("downbounded", params={"alpha": PIXEL_ALPHA}, description="alpha + exp(p): sigma > alpha")
def _downbounded(p, alpha):
    log_alpha = math.log(alpha)
    log_scale = log_alpha + F.softplus(p - log_alpha)  # logaddexp(log alpha, p)
    return alpha + torch.exp(p), log_scale


def _alpha_below_omega(values):
    if values["alpha"] >= values["omega"]:
        return f"bounded needs alpha < omega, got alpha={values['alpha']} >= omega={values['omega']}"
    return None


@register("bounded", params={"alpha": PIXEL_ALPHA, "omega": 1.0}, rule="0<alpha<omega", check=_alpha_below_omega,
          description="alpha + (omega - alpha) sigmoid(p): alpha < sigma < omega")
def _bounded(p, alpha, omega):
    log_alpha, log_width = math.log(alpha), math.log(omega - alpha)
    # log(alpha + (omega - alpha) * sigmoid(p)) = logaddexp(log alpha, log(omega-alpha) + logsigmoid(p))
    t = log_width + F.logsigmoid(p) - log_alpha
    log_scale = log_alpha + F.softplus(t)
    return alpha + (omega - alpha) * torch.sigmoid(p), log_scale


@register("constant", params={"c": 1.0}, description="sigma = c, p ignored (the paper's Cst priors)")
def _constant(p, c):
    return torch.full_like(p, c), torch.full_like(p, math.log(c))


def _log_softplus(x):
    """log(softplus(x)) without underflow: below -8 it is x - exp(x)/2 to O(exp(2x))."""
    far = x < -8
    zero = torch.zeros_like(x)
    x_far = torch.where(far, x, zero)  # each branch sees only inputs where it is safe
    x_near = torch.where(far, zero, x)
    return torch.where(far, x_far - 0.5 * torch.exp(x_far), torch.log(F.softplus(x_near)))


@register("softplus", params={"beta": 1.0},
          description="softplus(beta p) / beta (Efficient-VDVAE's gradient smoothing)")
def _softplus(p, beta):
    return F.softplus(beta * p) / beta, _log_softplus(beta * p) - math.log(beta)


@register("softclamp", description="exp(5 tanh(p / 5)) + 0.01 (NVAE's own)")
def _softclamp(p):
    # NVAE's own: sigma = exp(5 tanh(p / 5)) + 0.01
    c = 5.0 * torch.tanh(p / 5.0)
    log_eps = math.log(0.01)
    return torch.exp(c) + 0.01, log_eps + F.softplus(c - log_eps)


# Closed-form derivatives, for the one-node block math (``vaepatch.blockmath``): per name,
# ``fn(p, *params, need_scale) -> (scale, log_scale, dscale/dp, dlog_scale/dp)`` on float32 ``p``,
# computed without autograd (so an unselected branch's inf or NaN never reaches a gradient); scale and
# dscale may be None when ``need_scale`` is false (a prior needs only its log). A factor that is the
# same everywhere is a Python float. Names without one (naive_exp, downbounded, softclamp) use autograd.
_DERIVATIVES: dict = {}
LOWER_BOUNDED = {"bounded", "constant", "downbounded", "softclamp"}  # log sigma has a floor: no clamp needed


def derivatives(name: str):
    """Register ``fn(p, *params, need_scale) -> (scale, log_scale, dscale, dlog_scale)`` for ``name``."""
    def decorate(fn):
        _DERIVATIVES[name] = fn
        return fn
    return decorate


@derivatives("exp")
def _exp_d(p, need_scale=True):
    scale = torch.exp(p) if need_scale else None
    return scale, p, scale, 1.0


@derivatives("explin")
def _explin_d(p, need_scale=True):
    n = torch.clamp(p, max=0.0)
    q = torch.clamp(p, min=0.0)
    log_scale = torch.log1p(q).add_(n)
    dlog = q.add(1.0).reciprocal_()  # 1 / (1 + p+): 1 below 0
    if not need_scale:
        return None, log_scale, None, dlog
    en = n.exp_()  # n is not needed any more
    return en + q, log_scale, en, dlog  # dsigma = exp(p-): 1 above 0


# The forms below use only clamps and vectorized arithmetic (on CPU, torch.where and comparisons
# cost 5-30x an exp); log(2 - exp(-p+)) and log(sigma >= alpha) are accurate to float32 rounding.
@derivatives("upbounded")
def _upbounded_d(p, omega, need_scale=True):
    n = torch.clamp(p, max=0.0)
    r = torch.clamp(p, min=0.0).neg_().exp_()  # exp(-p+): 1 below 0
    two_minus_r = torch.sub(2.0, r)  # 1 below 0
    log_half = math.log(omega / 2.0)
    log_scale = torch.log(two_minus_r).add_(n).add_(log_half)
    dlog = torch.div(r, two_minus_r)  # 1 below 0, exp(-p) / (2 - exp(-p)) above
    if not need_scale:
        return None, log_scale, None, dlog
    en = n.exp_()  # exp(p-): 1 above 0; n is not needed any more
    scale = torch.sub(en, r).add_(1.0).mul_(omega / 2.0)  # omega/2 (exp(p-) + 1 - exp(-p+))
    return scale, log_scale, en.mul_(r).mul_(omega / 2.0), dlog  # dsigma = omega/2 exp(-|p|)


@derivatives("bounded")
def _bounded_d(p, alpha, omega, need_scale=True):
    s = torch.sigmoid(p)
    scale = (s * (omega - alpha)).add_(alpha)
    dscale = torch.sigmoid(-p).mul_(s).mul_(omega - alpha)  # sigmoid(-p), not 1 - s: exact where s rounds to 1
    return scale, torch.log(scale), dscale, dscale / scale


@derivatives("constant")
def _constant_d(p, c, need_scale=True):
    return c, math.log(c), 0.0, 0.0


@derivatives("softplus")
def _softplus_d(p, beta, need_scale=True):
    scale, log_scale = _REGISTRY["softplus"].function(p, beta)
    x = beta * p
    dscale = torch.sigmoid(x)
    # dlog = beta sigmoid(x) / softplus(x) -> beta as x -> -inf, where both underflow
    dlog = torch.where(x < -30.0, beta, (beta * dscale).div_(F.softplus(x)))
    return scale, log_scale, dscale, dlog


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
        return _REGISTRY[self.name].function(p, *self.args)

    @property
    def has_derivatives(self) -> bool:
        return self.name in _DERIVATIVES

    @property
    def lower_bounded(self) -> bool:
        """Whether log sigma has a floor (no clamp needed before exp(-log sigma))."""
        return self.name in LOWER_BOUNDED

    def derivatives(self, p: torch.Tensor, need_scale: bool = True):
        """``(scale, log_scale, dscale/dp, dlog_scale/dp)`` on float32 ``p``, without autograd (scale and
        dscale None where ``need_scale`` is false and the form saves work by it)."""
        return _DERIVATIVES[self.name](p, *self.args, need_scale=need_scale)

    def __str__(self):
        return self.spec


def _fmt(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


_ALIASES = {"cst": "constant", "const": "constant", "naiveexp": "naive_exp", "exp_lin": "explin"}
_SHORT_FORMS = ("short forms: upbounded1 = upbounded(1), cst1 = constant(1), downbounded0.01, softplus2, ...; "
                "numbers may be expressions like 1/(256*sqrt(12))")


def accepted() -> str:
    """Every registered form and the short forms, for error messages."""
    return ", ".join(entry.accepted for entry in _REGISTRY.values()) + "; " + _SHORT_FORMS


def names():
    """Parameterization names with one-line descriptions."""
    return {name: entry.description for name, entry in _REGISTRY.items()}


ACCEPTED = accepted()  # the built-ins, for messages; accepted() also lists later registrations

_SPEC = re.compile(r"^\s*([A-Za-z_]+?)\s*(?:\((.*)\)|([0-9][0-9.eE+-]*))?\s*$")


def get(spec) -> Scale:
    """Parse a spec such as ``"upbounded(1)"``, ``"upbounded1"``, ``"cst1"`` or ``"bounded(0.001, 1)"``."""
    if isinstance(spec, Scale):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"scale spec must be a string, got {type(spec).__name__} {spec!r}; accepted: {accepted()}")
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(f"malformed scale spec {spec!r}; accepted: {accepted()}")
    raw_name, inner, short = m.groups()
    name = raw_name.lower()
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown scale parameterization {raw_name!r} in {spec!r}; accepted: {accepted()}")
    entry = _REGISTRY[name]
    params, defaults, description = entry.params, entry.defaults, entry.description
    if inner is not None and inner.strip():
        values = [_number(v, spec) for v in inner.split(",")]
    elif short is not None:
        values = [_number(short, spec)]
    else:
        values = []
    if len(values) > len(params):
        raise ValueError(f"{name} takes {len(params)} parameter(s) ({', '.join(params) or 'none'}), "
                         f"got {len(values)} in {spec!r}; accepted: {accepted()}")
    values = tuple(values) + tuple(defaults[len(values):])
    _check_range(entry, dict(zip(params, values)), spec)
    return Scale(name, tuple(float(v) for v in values), description)


def _check_range(entry, values, spec):
    def bad(what):
        raise ValueError(f"{spec!r}: {what}; accepted: {accepted()}")

    for key, v in values.items():
        if not math.isfinite(v) or v <= 0:
            bad(f"{key} must be a finite number > 0, got {v}")
    problem = entry.check(values) if entry.check is not None else None
    if problem:
        bad(problem)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow}
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
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and len(node.args) == 1):
            return _FUNCS[node.func.id](ev(node.args[0]))
        raise ValueError

    try:
        return ev(ast.parse(text.strip(), mode="eval").body)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError):
        raise ValueError(f"cannot read number {text.strip()!r} in scale spec {spec!r}; "
                         f"accepted: {accepted()}") from None
