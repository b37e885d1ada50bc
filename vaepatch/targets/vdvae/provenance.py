"""Where a VDVAE step broke: read-only hooks on each decoder block (``vaepatch.runs.provenance``).

Group i is ``decoder.dec_blocks[i]``: its posterior head ``enc`` outputs (qm, qv) and its prior
head ``prior`` outputs (pm, pv, residual features), qv and pv being the raw scales; the block's
forward returns ``dict(kl=...)``. The hooks only reduce those tensors, so the step computes exactly
what it would without them, patched or vanilla.
"""
from __future__ import annotations

from vaepatch.runs.provenance import GroupWatch

__all__ = ["watch"]


def watch(vae, posterior, prior):
    """(GroupWatch, hook handles) on ``vae`` (a ``vae.VAE`` or its DistributedDataParallel wrapper)."""
    model = getattr(vae, "module", vae)
    blocks = list(model.decoder.dec_blocks)
    group_watch = GroupWatch([f"block {i} ({b.base}x{b.base})" for i, b in enumerate(blocks)],
                             {"posterior": posterior, "prior": prior})
    handles = []
    for i, block in enumerate(blocks):
        z = block.zdim

        def on_enc(module, inputs, out, i=i, z=z):
            group_watch.raw(i, "posterior", out[:, z:2 * z])

        def on_prior(module, inputs, out, i=i, z=z):
            group_watch.raw(i, "prior", out[:, z:2 * z])

        def on_block(module, inputs, out, i=i):
            group_watch.kl(i, out[1]["kl"])

        handles += [block.enc.register_forward_hook(on_enc), block.prior.register_forward_hook(on_prior),
                    block.register_forward_hook(on_block)]
    return group_watch, handles
