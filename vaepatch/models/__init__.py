"""Small reference models that vaepatch's parameterizations and OU smoothing are measured on."""
from __future__ import annotations

from vaepatch.models.mlp_hierarchy import MLPHierarchy, count_active
from vaepatch.models.mlp_training import train

__all__ = ["MLPHierarchy", "count_active", "train"]
