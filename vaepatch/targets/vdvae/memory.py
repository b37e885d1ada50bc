"""One training step of the tiny VDVAE with a variant applied, for ``vaepatch bench activation-memory``
(``vaepatch.bench.cost``): the model, batch and step of the step-time bench (``steptime``)."""
from __future__ import annotations

import contextlib

import torch

from vaepatch.targets.vdvae.tiny import batch, tiny_vae

# name -> (what it is, tiny_vae overrides): the models the bench measures
MODELS = {"tiny": ("width 32, zdim 8, 5 decoder blocks, batch 16 (the step-time bench's)", {})}


@contextlib.contextmanager
def training_step(variant, fuse=False, seed=0, model="tiny"):
    """Yields ``(loss, step, parameters)`` for a fresh model with ``variant`` applied (``fuse``: its
    compiled form): ``loss()`` runs the forward to the loss, whose graph autograd keeps for backward;
    ``step()`` one whole training step (SGD at lr 1e-6, as the step-time bench). Weights, batch and noise
    come from ``seed``, the same for every variant; ``model``: one of :data:`MODELS`. Reverted on exit."""
    import vaepatch

    vaepatch.revert("vdvae")
    vaepatch.apply(variant, target="vdvae", fuse=fuse)  # vanilla: imports the verified clone, patches nothing
    try:
        H, vae = tiny_vae(seed, **MODELS[model][1])
        x = batch(H.n_batch, seed)[0]
        optimizer = torch.optim.SGD(vae.parameters(), lr=1e-6)

        def loss():
            torch.manual_seed(seed)
            return vae(x, x)["elbo"]

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()

        yield loss, step, list(vae.parameters())
    finally:
        vaepatch.revert("vdvae")
