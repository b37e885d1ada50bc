"""What one training step costs, measured: matmul/conv FLOPs, activations saved for backward, peak RSS.

torch has no CPU allocator statistics, so memory is measured two honest ways: the bytes autograd
saves for the backward pass (exact, load-independent) and the rise of the process's peak resident set
(Linux VmHWM, reset through ``/proc/self/clear_refs``), which also holds gradients and allocator slack.
On CUDA, :func:`cuda_peak` reads the caching allocator's own peak.
"""
from __future__ import annotations

import ctypes
import weakref
from pathlib import Path

import torch

__all__ = ["counted_flops", "saved_bytes", "cuda_peak", "rss_now_and_peak", "rss_rise"]


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
class _Kept:
    """What the pack hook hands autograd: the saved tensor, with a weak reference to tell when autograd let go."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def saved_bytes(loss_fn, parameters) -> int:
    """Bytes of the tensors autograd holds for backward once ``loss_fn()`` has run: each storage once (a
    view holds its whole storage), parameters excluded; the graph is freed afterwards without a backward.

    Exact: a tensor saved by a node that was freed before the end (an unused result's) is not counted,
    and storages are told apart while all are alive, so a freed one's address reused is no confusion.
    Tensors a custom autograd Function keeps as ``ctx`` attributes, not through ``save_for_backward``,
    are not seen."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    kept = []

    def pack(t):
        box = _Kept(t.detach())  # the same storage; t itself would keep its node alive (an output it saved)
        if t.layout == torch.strided and t.device.type != "meta" and t.untyped_storage().data_ptr() not in skip:
            kept.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        loss = loss_fn()
    alive = [t for t in (ref() for ref in kept) if t is not None]  # while ``loss`` holds the graph
    storages = {(box.tensor.device, box.tensor.untyped_storage().data_ptr()): box.tensor.untyped_storage().nbytes()
                for box in alive}
    del loss
    return sum(storages.values())


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


def rss_rise(fn):
    """How far the peak resident set rises above the current one while ``fn()`` runs, in bytes; None where
    ``/proc/self/clear_refs`` is missing (not Linux). Freed heap memory goes back to the system first
    (glibc's ``malloc_trim``), so the rise is what ``fn`` allocates, not only what it adds to what an
    earlier call left in the allocator's free lists; the peak is reset through clear_refs."""
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the rise may miss reused memory
        pass
    clear.write_text("5")
    before, _ = rss_now_and_peak()
    fn()
    return rss_now_and_peak()[1] - before
