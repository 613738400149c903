"""Backend dispatch: one entry point from the block to the reference or the Triton kernels."""
import importlib.util
import os

import torch
import torch.nn.functional as F

from .reference import select_reference


def triton_available():
    return importlib.util.find_spec("triton") is not None


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend, tensor):
    """The backend that will run on `tensor`; "triton" where it cannot run is an error."""
    triton_runs = triton_available() and (tensor.is_cuda or _interpreting())
    if backend == "auto":
        return "triton" if triton_available() and tensor.is_cuda else "reference"
    if backend == "triton" and not triton_runs:
        why = "Triton is not installed" if not triton_available() else (
            f"the tensors are on {tensor.device} (Triton needs CUDA, or TRITON_INTERPRET=1 for "
            "the CPU interpreter)")
        raise RuntimeError(f"backend='triton' cannot run: {why}. Use backend='auto' or 'reference'.")
    return backend


def gather_kept(x, qkv, keep_idx):
    """Rows CLS + keep_idx of x (B, T, C) and qkv (B, T, 3C), contiguous."""
    rows = F.pad(keep_idx, (1, 0))  # CLS (index 0) first
    x_kept = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    qkv_kept = qkv.gather(1, rows[..., None].expand(-1, -1, qkv.shape[-1]))
    return x_kept, qkv_kept


def select_and_gather(x, qkv, num_heads, config):
    """(keep_idx, x_kept, qkv_kept) for block input x (B, T, C) and its packed qkv (B, T, 3C)."""
    args = (x, qkv, num_heads, config.k_anchors, config.top_m, config.alpha, config.score_norm)
    if resolve_backend(config.backend, x) == "triton":
        from . import kernels
        if not (torch.is_grad_enabled() and (x.requires_grad or qkv.requires_grad)):
            return kernels.select_and_gather(*args)
        # Training: the kernels' row copy has no backward, so gather the kept rows with torch.
        keep_idx = kernels.select_tokens(*args)
    else:
        keep_idx = select_reference(*args)
    return (keep_idx, *gather_kept(x, qkv, keep_idx))
