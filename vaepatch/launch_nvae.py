"""Deprecated: the NVAE launcher moved to ``vaepatch.targets.nvae.launch``. Kept for one release."""
import warnings

from vaepatch.targets.nvae.launch import LOSS_UNIT, StepRecorder, recording_scaler, run_nvae  # noqa: F401

warnings.warn("vaepatch.launch_nvae is deprecated: use vaepatch.targets.nvae.launch", DeprecationWarning,
              stacklevel=2)
