"""Deprecated: ``vaepatch run``'s command is ``vaepatch.run_command``, the VDVAE launcher
``vaepatch.targets.vdvae.launch``, the shared pieces ``vaepatch.runs``. Kept for one release."""
import warnings

from vaepatch.run_command import main  # noqa: F401
from vaepatch.runs.manifest import LaunchError  # noqa: F401
from vaepatch.runs.recorder import StopAtMaxSteps  # noqa: F401
from vaepatch.runs.script import load_script  # noqa: F401
from vaepatch.targets.vdvae.launch import StepRecorder, check_vdvae_args, run_vdvae  # noqa: F401

warnings.warn("vaepatch.launch is deprecated: use vaepatch.targets.vdvae.launch (run_vdvae), vaepatch.runs "
              "and vaepatch.run_command", DeprecationWarning, stacklevel=2)
