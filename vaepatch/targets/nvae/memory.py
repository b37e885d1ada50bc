"""One training step of the tiny NVAE with a variant applied, for ``vaepatch bench activation-memory``
(``vaepatch.bench.cost``): the model, batch and train.py step of the step-time bench (``steptime``).
NVAE's module names clash with openai/vdvae's: use it in an interpreter of its own."""
from __future__ import annotations

import contextlib

import torch

from vaepatch.targets.nvae.tiny import ADAMAX, BATCH, batch, nvae_on_cpu, tiny_nvae, train_step, training_loss

# name -> (what it is, tiny_nvae overrides): the models the bench measures. Without a flow (NVAE's train.py
# default, its MNIST command) the KL is Normal.kl; with one (its CIFAR-10 command) it is log q - log p.
MODELS = {"tiny": ("16 channels, 2x2 groups of 4 latents, one flow, batch 8 (the step-time bench's)", {}),
          "no flow": ("the same without the flow (--num_nf 0): the KL through Normal.kl", {"num_nf": 0})}


@contextlib.contextmanager
def training_step(variant, fuse=False, seed=0, model="tiny"):
    """Yields ``(loss, step, parameters)`` for a fresh model with ``variant`` applied (``fuse``: its
    compiled form): ``loss()`` runs the forward to train.py's loss, whose graph autograd keeps for backward;
    ``step()`` one whole train.py step (KL balancing, spectral and batch-norm regularisation, Adamax).
    Weights, batch and noise come from ``seed``, the same for every variant; ``model``: one of :data:`MODELS`.
    Reverted on exit."""
    import vaepatch

    with nvae_on_cpu():
        vaepatch.revert("nvae")
        vaepatch.apply(variant, target="nvae", fuse=fuse)  # vanilla: imports the verified clone, patches nothing
        import utils

        nvae = tiny_nvae(seed, **MODELS[model][1])
        x = batch(BATCH, seed)
        optimizer = torch.optim.Adamax(nvae.parameters(), **ADAMAX)
        alpha_i = utils.kl_balancer_coeff(num_scales=nvae.num_latent_scales,
                                          groups_per_scale=nvae.groups_per_scale, fun="square")

        def loss():
            torch.manual_seed(seed)
            return training_loss(nvae, x, alpha_i, 0)

        def step():
            torch.manual_seed(seed)
            train_step(nvae, optimizer, x, alpha_i, 0)

        yield loss, step, list(nvae.parameters())
