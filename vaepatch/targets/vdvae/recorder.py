"""VDVAE's steps, recorded around its own ``training_step`` (``vaepatch run vdvae``)."""
from __future__ import annotations

import math
import time

from vaepatch.runs.recorder import StepRecorder as BaseStepRecorder
from vaepatch.runs.provenance import gradient_top
from vaepatch.targets.vdvae.patch import UPSTREAM_SCALE
from vaepatch.targets.vdvae.provenance import watch

__all__ = ["StepRecorder"]


class StepRecorder(BaseStepRecorder):
    """Wraps upstream's ``training_step`` to write one event per call, with the truth about the step.

    ``reason`` follows VDVAE's own rule (a NaN mean loss on any rank, or a grad norm at or above
    ``skip_threshold`` / NaN), except that any non-finite loss counts as ``"nan"``: upstream checks
    only ``isnan``, so an inf loss is skipped only through its grad norm. Each event also carries this
    rank's ``kl`` (VDVAE's rate) and ``recon`` (its distortion), nats per dim, and on a failing step
    ``where`` it broke (``provenance.watch``, read-only hooks; ``scales`` = (posterior, prior) turn raw
    outputs into sigma for the record; ``provenance=False`` leaves the model unhooked).
    """

    def __init__(self, writer=None, max_steps: int | None = None, scales=(UPSTREAM_SCALE, UPSTREAM_SCALE),
                 provenance: bool = True, **stall):
        super().__init__(writer, max_steps, **stall)
        self._in_step = False
        self._local, self._ranges = None, []
        self.scales, self.provenance = scales, provenance
        self.watch = self._hooks = self._model = None

    def stats_over_ranks(self, original):
        """Wrap ``get_cpu_stats_over_ranks`` to keep this rank's own loss and parts before ranks are averaged."""
        def get_cpu_stats_over_ranks(stat_dict):
            if self._in_step and "elbo" in stat_dict:
                import torch

                parts = [torch.as_tensor(stat_dict[k]).detach().float().reshape(())
                         for k in ("elbo", "rate", "distortion") if k in stat_dict]
                ranges = [v.float().reshape(()).to(parts[0].device) for v in self.watch.ranges()] if self.watch else []
                values = torch.stack(parts + ranges).tolist()  # one host sync: the loss parts and the scale ranges
                self._local, self._ranges = values[:len(parts)], values[len(parts):]
            return original(stat_dict)
        return get_cpu_stats_over_ranks

    def training_step(self, original):
        def training_step(H, data_input, target, vae, ema_vae, optimizer, iterate):
            self.check_max_steps(iterate)
            self.model = getattr(vae, "module", vae)
            if self.provenance and self.watch is None and hasattr(getattr(vae, "module", vae), "decoder"):
                self.watch, self._hooks = watch(vae, *self.scales)
                self._model = getattr(vae, "module", vae)
            if self.watch is not None:
                self.watch.reset()
            self._in_step, self._local, self._ranges = True, None, []
            start = time.perf_counter()
            try:
                stats = original(H, data_input, target, vae, ema_vae, optimizer, iterate)
            finally:
                self._in_step = False
            elapsed = time.perf_counter() - start
            self.record(iterate, stats, elapsed)
            return stats
        return training_step

    def record(self, step, stats, elapsed) -> None:
        mean_loss = float(stats["elbo"])
        any_rank_nonfinite = (not math.isfinite(mean_loss) or stats.get("distortion_nans", 0) > 0
                              or stats.get("rate_nans", 0) > 0)
        skipped = bool(stats["skipped_updates"])
        reason = None if not skipped else ("nan" if any_rank_nonfinite else "grad")
        local = self._local or [mean_loss]
        loss = local[0]
        kl, recon = (local[1], local[2]) if len(local) == 3 else (None, None)
        nonfinite = [name for name, v in (("kl", kl), ("recon", recon)) if v is not None and not math.isfinite(v)]
        failing = skipped or not math.isfinite(loss)
        where = self.watch.where() if self.watch is not None and failing else None
        if where is not None and self._model is not None:  # the skipped update's gradients are still there
            where["grad_top"] = gradient_top(self._model.named_parameters())
        scale = self.watch.log_sigma_ranges(self._ranges) if self.watch is not None and self._ranges else None
        self.write(step, loss, float(stats["grad_norm"]), skipped, reason, elapsed, kl=kl, recon=recon,
                   nonfinite=nonfinite or None, scale=scale, where=where)

    def close(self) -> None:
        for handle in self._hooks or ():
            handle.remove()
        super().close()
