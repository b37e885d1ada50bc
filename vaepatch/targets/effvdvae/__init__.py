"""Rayhane-mamah/Efficient-VDVAE (its PyTorch half): everything vaepatch knows about it (``vaepatch.targets``).

- ``config.py``: Efficient-VDVAE reads its hyper-parameters when its modules are imported, through the
  ``hparams`` library, from ``hparams.cfg`` in the working directory: writing a run's own config, loading it;
- ``patch.py``: what ``vaepatch.apply(..., target="effvdvae")`` replaces (how a latent layer turns its
  raw output into sigma, the KL from sigma ratios);
- ``shims.py``: today's-stack fixes (tensorflow, torchvision, gcsfs stand-ins; CUDA-only code on CPU);
- ``launch.py``: ``vaepatch run effvdvae``, its train.py with every step logged (``recorder.py``);
- ``logs.py``: its own TensorBoard validation NELBO for ``vaepatch compare``;
- ``tiny.py``: a tiny configuration of the real model for tests and benches.
"""
NAME = "effvdvae"
REPO = "Rayhane-mamah/Efficient-VDVAE"
MODULES = ("model.latent_layers", "model.layers", "model.losses")
IMPORT_HINT = ("Efficient-VDVAE's modules read their configuration when imported (its train.py loads it first: "
               "HParams('.', name='efficient_vdvae') reads ./hparams.cfg). Load one first: "
               "vaepatch.targets.effvdvae.config.load(FOLDER) with FOLDER/hparams.cfg, after "
               "vaepatch.targets.effvdvae.shims.install(cpu) where tensorflow, torchvision or gcsfs are missing")
