"""Efficient-VDVAE's steps, recorded around its own functions in ``model/model.py`` (``vaepatch run effvdvae``).

``train()`` calls ``train_step`` once per step (``step_n`` = its global step, 0 first); inside it
``compute_loss`` gives the step's reconstruction and KL (bits/dim), and ``gradient_skip`` its gradient norm and
whether the update is skipped. Upstream counts NaN and threshold skips in one counter (``GradSkipCount``); here
they are counted apart: ``reason`` is ``"grad"`` when the loss and the gradient norm were finite and the norm
reached ``optimizer.gradient_skip_threshold``, ``"nan"`` when either was not.
"""
from __future__ import annotations

import math
import time

from vaepatch.runs.provenance import gradient_top
from vaepatch.runs.recorder import StepRecorder as BaseStepRecorder
from vaepatch.targets.effvdvae.provenance import watch

__all__ = ["StepRecorder"]

LN2 = math.log(2)


class StepRecorder(BaseStepRecorder):
    """One event per ``train_step``: ``loss`` the step's NELBO in nats/dim (``recon`` + ``kl``, before the KL's
    beta and gamma schedules, which scale only the loss the gradient comes from), ``grad_norm`` upstream's global
    norm, ``skipped`` upstream's decision; on a failing step ``where`` it broke (``provenance.watch``;
    ``scales`` = (posterior, prior) turn raw outputs into sigma for the record)."""

    def __init__(self, writer=None, max_steps: int | None = None, scales=None, kl_module=None,
                 provenance: bool = True, **stall):
        super().__init__(writer, max_steps, **stall)
        self.scales, self.kl_module, self.provenance = scales, kl_module, provenance
        self.watch, self._hooks = None, ()
        self._in_step, self._parts, self._skip, self._grad_top = False, None, None, None

    def train_step(self, original):
        """Wrap ``train_step(model, ema_model, optimizer, inputs, step_n)``."""
        def train_step(model, ema_model, optimizer, inputs, step_n):
            self.check_max_steps(int(step_n))
            self.model = getattr(model, "module", model)
            if self.provenance and self.watch is None and self.kl_module is not None and self.scales:
                self.watch, self._hooks = watch(self.model, self.kl_module, *self.scales)
            if self.watch is not None:
                self.watch.reset()
            self._in_step, self._parts, self._skip, self._grad_top = True, None, None, None
            start = time.perf_counter()
            try:
                out = original(model, ema_model, optimizer, inputs, step_n)
            finally:
                self._in_step = False
            self.record(int(step_n), time.perf_counter() - start)
            return out
        return train_step

    def compute_loss(self, original):
        """Wrap ``compute_loss``: the first call of a step is its own (the others are evaluation's)."""
        def compute_loss(*args, **kwargs):
            out = original(*args, **kwargs)
            if self._in_step and self._parts is None:
                self._parts = (out[0].detach(), out[5].detach())  # reconstruction, KL: bits/dim
            return out
        return compute_loss

    def gradient_skip(self, original):
        """Wrap ``gradient_skip(global_norm)``: the norm and the decision, and on a skipped or non-finite step
        what drove the gradient (read here: train_step zeroes the gradients before it returns)."""
        def gradient_skip(global_norm):
            skip, delta = original(global_norm)
            if self._in_step:
                self._skip = (global_norm.detach(), bool(skip))
                if self.model is not None and (skip or not bool(global_norm.isfinite())):
                    self._grad_top = gradient_top(self.model.named_parameters())
            return skip, delta
        return gradient_skip

    def record(self, step: int, elapsed: float) -> None:
        import torch

        nan = torch.tensor(math.nan)
        recon, kl = self._parts if self._parts is not None else (nan, nan)
        norm, skipped = self._skip if self._skip is not None else (nan, False)
        ranges = self.watch.ranges() if self.watch is not None else []
        values = [torch.as_tensor(v).float().reshape(()).to(recon.device) for v in (recon, kl, norm, *ranges)]
        recon, kl, norm, *ranges = torch.stack(values).tolist()  # one host sync
        recon, kl = recon * LN2, kl * LN2  # nats/dim, as the other targets' events
        loss = recon + kl
        finite = math.isfinite(loss)
        reason = None if not skipped else ("grad" if finite and math.isfinite(norm) else "nan")
        nonfinite = [name for name, v in (("kl", kl), ("recon", recon)) if not math.isfinite(v)]
        where = self.watch.where() if self.watch is not None and (skipped or not finite) else None
        if where is not None and self._grad_top is not None:
            where["grad_top"] = self._grad_top
        scale = self.watch.log_sigma_ranges(ranges) if ranges else None
        self.write(step, loss, norm, skipped, reason, elapsed, kl=kl, recon=recon, nonfinite=nonfinite or None,
                   scale=scale, where=where)

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        super().close()
