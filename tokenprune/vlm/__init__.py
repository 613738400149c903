"""Fewer image tokens for vision-language models on Hugging Face transformers.

- prune.py: the public `prune_image_tokens`, which checks its arguments and hands the model to
  its family;
- families.py: the table of families (config.model_type -> its module), which every list of
  supported families reads;
- base.py: what every family's pruning shares (hooks, wrapped methods, the processor's count,
  undoing it); units.py: the unit counts and grids;
- one module per family: llava.py, llava_next.py, llava_onevision.py, qwen2_vl.py,
  qwen2_5_vl.py, qwen3_vl.py, qwen3_vl_moe.py, qwen3_5.py, qwen3_5_moe.py, gemma3.py, internvl.py.
The unit selection itself is tokenprune.selection's, as for the ViTs. The names below are
imported on first use, so that reading the family table imports nothing heavy.
"""
import importlib

_PUBLIC = {"prune_image_tokens": "prune", "family_of": "prune",
           "ImageTokenPruning": "base", "image_token_pruning": "base",
           "remove_image_token_pruning": "base", "ATTRIBUTE": "base",
           "FAMILIES": "families", "supported": "families"}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
