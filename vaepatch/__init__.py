"""vaepatch: numerically stable scales and KL for the reference hierarchical VAEs.

    import vaepatch
    vaepatch.apply("upbounded1")      # patch openai/vdvae (and NVlabs/NVAE) in place
    vaepatch.revert()                 # exact restore

See ``vaepatch.variants()`` for the built-in variants and ``vaepatch.scales`` for the
parameterizations.
"""
from vaepatch import gaussian, scales
from vaepatch.api import active, apply, patched, revert
from vaepatch.variant import OU, Variant, variants
from vaepatch.version import __version__

__all__ = ["apply", "revert", "patched", "active", "OU", "Variant", "variants", "scales", "gaussian", "__version__"]
