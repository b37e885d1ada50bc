"""16-bit inputs, float32 math: the one rule the parameterizations, the KL and the log-density share.

In float16/bfloat16 the chain rule through compositions such as ``log(softplus(x))`` overflows in
intermediates even when the true gradient is small, and ``exp(-log_scale)`` overflows at
log_scale < -11.1 in float16 although the KL term it feeds is often representable. The elementwise
math is cheap, so it runs in float32 and the result goes back in the inputs' dtype: two casts, not
a float32 model.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["HALF", "half_dtype", "float32_math"]

HALF = (torch.float16, torch.bfloat16)


def half_dtype(*xs):
    """The 16-bit dtype the tensor arguments promote to, or None (python numbers are ignored)."""
    dtypes = [x.dtype for x in xs if isinstance(x, torch.Tensor)]
    dtype = functools.reduce(torch.promote_types, dtypes) if dtypes else None
    return dtype if dtype in HALF else None


def float32_math(fn):
    """Decorate ``fn(*args)``: with 16-bit tensor arguments it runs on float32 copies, and its tensor
    result (or tuple of tensors) is cast back to the 16-bit dtype."""

    @functools.wraps(fn)
    def wrapper(*args):
        half = half_dtype(*args)
        if half is None:
            return fn(*args)
        out = fn(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))
        return tuple(o.to(half) for o in out) if isinstance(out, tuple) else out.to(half)

    return wrapper
