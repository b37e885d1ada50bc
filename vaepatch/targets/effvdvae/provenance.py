"""Where an Efficient-VDVAE step broke: read-only hooks (``vaepatch.runs.provenance``).

Group i is the i-th top-down block in the order train() sums their KLs (each resolution's upsampling block,
then its other blocks). Each block's prior and posterior ``GaussianLatentLayer`` end in a 1x1 ``projection``
to (mean, raw scale): hooks there see the raw scales, patched or vanilla (with the residual posterior the
posterior's is its ratio to the prior's). The KL module (``model.model.kldiv_loss``) is called once per
group per loss: a hook there sees each group's KL. The hooks only reduce tensors.
"""
from __future__ import annotations

from vaepatch.runs.provenance import GroupWatch

__all__ = ["blocks", "watch"]


def blocks(model) -> list:
    """The top-down blocks of ``model`` (a ``UniversalAutoEncoder``) in KL order."""
    top_down = model.top_down
    return [b for upsample, rest in zip(top_down.levels_down_upsample, top_down.levels_down) for b in (upsample, *rest)]


def watch(model, kl_module, posterior, prior):
    """(GroupWatch, hook handles) on ``model`` and the KL module; call ``.reset()`` at each step's start."""
    groups = blocks(model)
    group_watch = GroupWatch([f"block {i}" for i in range(len(groups))], {"posterior": posterior, "prior": prior})
    calls = {"kl": 0}

    def raw_of(out):
        return out.chunk(2, dim=1)[1]

    handles = []
    for i, block in enumerate(groups):
        handles.append(block.posterior_layer.projection.register_forward_hook(
            lambda m, a, out, i=i: group_watch.raw(i, "posterior", raw_of(out))))
        handles.append(block.prior_layer.projection.register_forward_hook(
            lambda m, a, out, i=i: group_watch.raw(i, "prior", raw_of(out))))

    def on_kl(module, inputs, out):
        group_watch.kl(calls["kl"] % len(groups), out[0])
        calls["kl"] += 1

    handles.append(kl_module.register_forward_hook(on_kl))
    reset = group_watch.reset

    def reset_all():
        calls["kl"] = 0
        reset()

    group_watch.reset = reset_all
    return group_watch, handles
