"""``torch.compile`` for the patches' elementwise math, with an eager fallback.

Both targets' ``fuse=True`` wrap their per-group math (scales, draw, KL) in :func:`fused`: on a GPU
each elementwise pass is a kernel launch, compiled they are a few fused kernels. Knows no upstream.
"""
from __future__ import annotations

import types
import warnings

import torch

__all__ = ["fused"]


def fused(fn):
    """``torch.compile(fn)``, falling back to ``fn`` (with a warning) if compiling fails.

    The fallback matters: a missing C++ compiler or Triton must not kill a long run.
    """
    compiled = torch.compile(_own_code(fn), dynamic=True)
    state = {"impl": compiled}

    def call(*args):
        try:
            return state["impl"](*args)
        except Exception as err:  # noqa: BLE001 - any compile failure: run eager instead
            if state["impl"] is fn:
                raise
            warnings.warn(f"vaepatch: torch.compile of the fused block math failed ({type(err).__name__}: {err}); "
                          "running it eagerly (same numbers, slower)", stacklevel=2)
            state["impl"] = fn
            return fn(*args)

    return call


def _own_code(fn):
    """``fn`` with a code object of its own. torch.compile keeps compiled versions, and counts recompiles
    against its limit (8), per code object; the patches' functions share some (precision's wrapper
    under both the KL and the log density, one head-map closure per side), and each layout or shape
    pattern is one more version: past the limit the function silently runs eagerly."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
