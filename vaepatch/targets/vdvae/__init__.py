"""openai/vdvae: everything vaepatch knows about it (the registry's protocol: ``vaepatch.targets``).

- ``patch.py``: what ``vaepatch.apply(..., target="vdvae")`` replaces (``DecBlock.sample``,
  ``sample_uncond``, the Gaussian helpers), and ``fuse=True``;
- ``ou.py``: OU-smoothed priors between decoder blocks;
- ``shims.py``: today's-stack fixes (apex, numpy, torchvision, CPU);
- ``launch.py``: ``vaepatch run vdvae``, train.py under MPI with every step logged;
- ``logs.py``: VDVAE's own ``log.jsonl`` for ``vaepatch compare``;
- ``tiny.py``: a tiny real model for tests and benches; ``steptime.py`` and ``stress.py``: its benches.
"""
NAME = "vdvae"
REPO = "openai/vdvae"
MODULES = ("vae_helpers", "vae")
IMPORT_HINT = ""
BENCHES = {"vdvae-step-time": "vaepatch.targets.vdvae.steptime", "vdvae-stress": "vaepatch.targets.vdvae.stress"}
