"""NVAE's steps, recorded without touching its training loop (``vaepatch run nvae``).

``train()``'s data queue marks where a step starts (and stops the run cleanly at --max-steps),
NVAE's ``GradScaler`` is replaced by a subclass that sees the loss (``scale``), unscales and measures
the gradient norm (``step``) and learns whether AMP skipped the update (``update``: the scale backs
off exactly when inf/NaN gradients were found), and ``utils.reconstruction_loss`` and the model's
heads are read for the loss's parts and for where a failing step broke.
"""
from __future__ import annotations

import math
import time

from vaepatch.runs.recorder import StepRecorder as BaseStepRecorder
from vaepatch.runs.provenance import gradient_top
from vaepatch.targets.nvae.patch import UPSTREAM_SCALE
from vaepatch.targets.nvae.provenance import watch

__all__ = ["StepRecorder", "recording_scaler"]


def _grad_norm(optimizer):
    """Global gradient norm as a 0-d tensor on the gradients' device (no host sync), or None."""
    import torch

    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class StepRecorder(BaseStepRecorder):
    """One process's step events: :meth:`train` wraps NVAE's ``train``, :func:`recording_scaler`
    its ``GradScaler``, :meth:`reconstruction_loss` NVAE's ``utils.reconstruction_loss`` (read only);
    :meth:`open` names the file and the rank once the rank is known. Each event also carries this
    process's ``kl`` (the sum over groups of the batch-mean KL) and ``recon`` (the batch-mean
    reconstruction loss), nats per image, and on a failing step ``where`` it broke (``provenance``)."""

    def __init__(self, writer=None, max_steps: int | None = None, skip_nonfinite: bool = False,
                 scales=(UPSTREAM_SCALE, UPSTREAM_SCALE), provenance: bool = True, **stall):
        super().__init__(writer, max_steps, **stall)
        self.skip_nonfinite = skip_nonfinite
        self.scales, self.provenance = scales, provenance
        self.watch, self._hooks, self._model = None, (), None
        self.step = 0
        self._reset()

    def _reset(self):
        self.loss, self.grad_norm, self.guard_skipped, self.started = None, None, False, None
        self.kl = self.recon = None
        if self.watch is not None:
            self.watch.reset()

    def train(self, original):
        """Wrap NVAE's ``train(train_queue, model, optimizer, grad_scalar, global_step, ...)``."""
        def train(train_queue, model, cnn_optimizer, grad_scalar, global_step, *args, **kwargs):
            self.step = int(global_step)
            self.model = model
            if self.provenance and self.watch is None and hasattr(model, "enc_sampler"):
                self.watch, self._hooks = watch(model, *self.scales, on_kl=self._on_kl)
                self._model = model
            return original(_Batches(train_queue, self), model, cnn_optimizer, grad_scalar, global_step,
                            *args, **kwargs)
        return train

    def _on_kl(self, kl_all) -> None:
        if self.started is not None and self.kl is None and self.loss is None:  # the step's own forward
            self.kl = sum(kl.detach().float().mean() for kl in kl_all)

    def reconstruction_loss(self, original):
        """Wrap ``utils.reconstruction_loss``: the first call of a step is the one in its loss."""
        def reconstruction_loss(*args, **kwargs):
            out = original(*args, **kwargs)
            if self.started is not None and self.recon is None and self.loss is None:
                self.recon = out.detach().float().mean()
            return out
        return reconstruction_loss

    def before_batch(self) -> None:
        self.check_max_steps(self.step)

    def batch_ready(self) -> None:
        self._reset()
        self.started = time.perf_counter()

    def end_step(self, amp_skipped) -> None:
        """Write the step's event. ``loss``, ``grad_norm``, ``amp_skipped``, the KL and reconstruction
        parts may be device tensors: they are read back together, one host sync per step."""
        if self.loss is None:  # GradScaler.update outside a recorded step (not in NVAE's loop)
            return
        import torch

        nan = math.nan
        values = [self.loss, self.grad_norm if self.grad_norm is not None else nan, amp_skipped,
                  self.kl if self.kl is not None else nan, self.recon if self.recon is not None else nan]
        values += self.watch.ranges() if self.watch is not None else []
        loss, grad_norm, amp_skipped, kl, recon, *ranges = torch.stack(  # one host sync for all of them
            [torch.as_tensor(v, device=self.loss.device).float().reshape(()) for v in values]).tolist()
        scale = self.watch.log_sigma_ranges(ranges) if ranges else None
        finite = math.isfinite(loss)
        skipped = self.guard_skipped or bool(amp_skipped)
        reason = None if not skipped else ("nan" if not finite else "amp")
        elapsed = time.perf_counter() - (self.started if self.started is not None else time.perf_counter())
        parts = {"kl": kl if self.kl is not None else None, "recon": recon if self.recon is not None else None}
        nonfinite = [name for name, v in parts.items() if v is not None and not math.isfinite(v)]
        where = self.watch.where() if self.watch is not None and (skipped or not finite) else None
        if where is not None and self._model is not None:  # gradients of the step, applied or not
            where["grad_top"] = gradient_top(self._model.named_parameters(), depth=3)
        grad_norm = None if self.grad_norm is None else grad_norm
        step = self.step
        self.step += 1
        self._reset()  # before writing: a stall stop (StopStalled) leaves the recorder consistent
        self.write(step, loss, grad_norm, skipped, reason, elapsed, nonfinite=nonfinite or None, scale=scale,
                   where=where, **parts)

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        super().close()


class _Batches:
    """NVAE's data queue, marking where each step starts and stopping at --max-steps."""

    def __init__(self, loader, recorder: StepRecorder):
        self.loader, self.recorder = loader, recorder

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            self.recorder.before_batch()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.recorder.batch_ready()
            yield batch


def recording_scaler(base: type, recorder: StepRecorder) -> type:
    """A subclass of NVAE's ``GradScaler`` class that reports each step to ``recorder``."""
    import torch

    class RecordingGradScaler(base):
        def scale(self, outputs):
            recorder.loss = outputs.detach()  # this process's own loss, before any averaging
            return super().scale(outputs)

        def step(self, optimizer, *args, **kwargs):
            if self.is_enabled():
                self.unscale_(optimizer)  # records found-inf; step() then does not unscale again
            recorder.grad_norm = _grad_norm(optimizer)
            if recorder.skip_nonfinite and recorder.loss is not None and not bool(torch.isfinite(recorder.loss)):
                recorder.guard_skipped = True
                return None
            return super().step(optimizer, *args, **kwargs)

        def update(self, new_scale=None):
            watch = self.is_enabled() and new_scale is None
            # the scale tensor, compared on its device (get_scale() would sync to the host twice)
            before = self._scale.clone() if watch else None
            super().update(new_scale)
            # AMP backs the scale off exactly when it found inf/NaN gradients and skipped the step
            recorder.end_step(amp_skipped=self._scale < before if watch else False)

    RecordingGradScaler.__qualname__ = RecordingGradScaler.__name__ = f"Recording{base.__name__}"
    return RecordingGradScaler
