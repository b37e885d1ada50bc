"""What one training step costs, measured: matmul/conv FLOPs, activations saved for backward, peak RSS.

torch has no CPU allocator statistics, so memory is measured two honest ways: the bytes autograd
saves for the backward pass (exact, load-independent) and the rise of the process's peak resident set
(Linux VmHWM, reset through ``/proc/self/clear_refs``), which also holds gradients and allocator slack.
On CUDA, :func:`cuda_peak` reads the caching allocator's own peak.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["counted_flops", "saved_bytes", "cuda_peak", "rss_now_and_peak"]


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, **_):
    """A convolution's backward: grad input and grad weight each cost what its forward does.

    torch's own formula ignores ``groups`` in the grad-weight term, so a depthwise convolution's
    backward counts ~groups times over (NVAE's decoder cells are full of them).
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def counted_flops(step_fn) -> int:
    """Matmul/conv FLOPs of ``step_fn()`` (forward + backward) by torch's FlopCounterMode, with
    grouped convolutions' backward counted right (:func:`_conv_backward_flops`)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        step_fn()
    return int(counter.get_total_flops())


# -- memory ------------------------------------------------------------------------------------
def saved_bytes(loss_fn, parameters) -> int:
    """Bytes of the tensors autograd saves for backward while ``loss_fn()`` runs (each storage once,
    parameters excluded); the graph is freed afterwards without a backward."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    seen = {}

    def pack(t):
        if t.device.type == "cpu" and t.layout == torch.strided:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values())


def cuda_peak(fn, device) -> dict:
    """Run ``fn()`` once on CUDA ``device``: ``peak_bytes``, the most the allocator held during it (the peak
    is reset first: ``torch.cuda.max_memory_allocated``), and ``step_bytes``, its rise above what was
    allocated before the call (activations, gradients, temporaries; not the weights already resident)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "step_bytes": peak - base}


def rss_now_and_peak():
    """(current, peak) resident set in bytes from /proc/self/status; the peak resets with clear_refs."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return 1024 * int(fields["VmRSS"].split()[0]), 1024 * int(fields["VmHWM"].split()[0])
