"""Where an NVAE step broke: read-only hooks on the model's heads (``vaepatch.runs.provenance``).

Group i's posterior head is ``enc_sampler[i]``, its prior head ``dec_sampler[i - 1]`` (group 0's
prior is the fixed N(0, 1)); each outputs (mean, raw scale) halves. ``AutoEncoder.forward``
returns ``kl_all``, one KL per group. The hooks are registered before vaepatch's own head hooks
(which map raw scales to exact log sigmas during the call), so they see the raw outputs; they only
reduce tensors, so the step computes exactly what it would without them.
"""
from __future__ import annotations

from vaepatch.runs.provenance import GroupWatch

__all__ = ["watch"]


def watch(model, posterior, prior, on_kl=None):
    """(GroupWatch, hook handles) on NVAE's ``model``; ``on_kl(kl_all)`` also sees each forward's KLs."""
    enc, dec = list(getattr(model, "enc_sampler", ())), list(getattr(model, "dec_sampler", ()))
    group_watch = GroupWatch([f"group {i}" for i in range(len(enc))], {"posterior": posterior, "prior": prior})

    def raw_of(out):
        return out.chunk(2, dim=1)[1]

    handles = []
    for i, head in enumerate(enc):
        handles.append(head.register_forward_hook(lambda m, a, out, i=i: group_watch.raw(i, "posterior", raw_of(out))))
    for i, head in enumerate(dec):
        handles.append(head.register_forward_hook(lambda m, a, out, i=i: group_watch.raw(i + 1, "prior", raw_of(out))))

    def on_forward(module, inputs, out):
        kl_all = out[3]
        for i, kl in enumerate(kl_all):
            group_watch.kl(i, kl)
        if on_kl is not None:
            on_kl(kl_all)

    handles.append(model.register_forward_hook(on_forward))
    return group_watch, handles
