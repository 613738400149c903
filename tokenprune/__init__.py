"""Training-free visual token pruning for Vision Transformers (OpenCLIP, timm, Hugging Face
transformers) and the image tokens of LLaVA-style vision-language models."""
import importlib

# Where each public name lives. They are imported on first use (PEP 562), so that the command
# line can answer `--help` and bad flags without importing torch and open_clip.
_PUBLIC = {
    "PruneConfig": "config",
    "PrunedResidualAttentionBlock": "block",
    "PrunedVisionEncoder": "patch",
    "UnsupportedModelError": "patch",
    "apply_pruning_to_model": "patch",
    "prune_image_tokens": "vlm",
    "pruned_block": "patch",
    "pruned_blocks": "patch",
    "remove_pruning": "patch",
    "replace_last_block": "patch",
    "select_and_gather": "selection",
    "select_reference": "reference",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.2.0"


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tokenprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
