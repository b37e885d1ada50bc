"""NVlabs/NVAE: everything vaepatch knows about it (the registry's protocol: ``vaepatch.targets``).

- ``patch.py``: what ``vaepatch.apply(..., target="nvae")`` replaces (``distributions.Normal``, the
  heads' side through hooks, ``NormalDecoder``);
- ``ou.py``: OU-smoothed priors through NVAE's decoder tower;
- ``shims.py``: today's-stack fixes (tensorboardX, lmdb, torchvision, numpy, torch.load, CPU);
- ``launch.py``: ``vaepatch run nvae``, train.py in every process it starts, every step logged;
- ``logs.py``: NVAE's own ``log.txt`` for ``vaepatch compare``;
- ``tiny.py``: a tiny real model and train.py's step for tests and benches; ``steptime.py``: its bench.
"""
NAME = "nvae"
REPO = "NVlabs/NVAE"
MODULES = ("distributions", "model")
IMPORT_HINT = ("NVAE imports tensorboardX, lmdb and torchvision at module level. Install them, or switch on "
               "vaepatch's stand-ins first: vaepatch.targets.nvae.shims.install(cpu) (cpu=True also "
               "makes .cuda() and the batch norms work on CPU)")
BENCHES = {"nvae-step-time": "vaepatch.targets.nvae.steptime"}
