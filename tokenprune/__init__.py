"""Training-free visual token pruning for OpenCLIP Vision Transformers."""
from .block import PrunedResidualAttentionBlock
from .config import PruneConfig
from .patch import (PrunedVisionEncoder, UnsupportedModelError, apply_pruning_to_model,
                    pruned_block, remove_pruning, replace_last_block)
from .reference import select_reference
from .selection import select_and_gather

__all__ = ["PruneConfig", "PrunedResidualAttentionBlock", "PrunedVisionEncoder",
           "UnsupportedModelError", "apply_pruning_to_model", "pruned_block", "remove_pruning",
           "replace_last_block", "select_and_gather", "select_reference"]
__version__ = "0.1.0"
