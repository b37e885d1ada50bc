"""Deprecated: per-step events moved to ``vaepatch.runs.events``. Kept for one release."""
import warnings

from vaepatch.runs.events import (FILENAME, KEYS, REASONS, Counts, EventLog, EventWriter,  # noqa: F401
                                  count, read)

warnings.warn("vaepatch.events is deprecated: use vaepatch.runs.events", DeprecationWarning, stacklevel=2)
