"""Deprecated: the shim engine is ``vaepatch.runs.shims``; each upstream's shims are in its target folder
(``vaepatch.targets.vdvae.shims.SHIMS``, ``vaepatch.targets.nvae.shims.SHIMS``). Kept for one release."""
import warnings

from vaepatch.runs.shims import CompatError, Installed, Shim, install
from vaepatch.runs.shims import needed as _needed
from vaepatch.targets.nvae.shims import SHIMS as NVAE_SHIMS
from vaepatch.targets.nvae.shims import _batch_norm_cpu  # noqa: F401  (used by callers of the old module)
from vaepatch.targets.vdvae.shims import SHIMS as VDVAE_SHIMS
from vaepatch.targets.vdvae.shims import fused_adam_stand_in  # noqa: F401

__all__ = ["CompatError", "Shim", "VDVAE_SHIMS", "NVAE_SHIMS", "needed", "install", "Installed"]

warnings.warn("vaepatch.compat is deprecated: use vaepatch.runs.shims and vaepatch.targets.<name>.shims",
              DeprecationWarning, stacklevel=2)


def needed(cpu: bool, shims=VDVAE_SHIMS):
    """The shims this machine needs (default: VDVAE's, as before)."""
    return _needed(cpu, shims)
