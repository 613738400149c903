"""Backend dispatch: one entry point from the block to the reference or the Triton kernels."""
import importlib.util
import os
from typing import TYPE_CHECKING, Optional, Tuple

import torch

from .reference import check_inputs, select_reference

if TYPE_CHECKING:
    from .config import PruneConfig


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


def kept_rows(keep_idx, num_prefix=1):
    """(B, p + k + m) row indices of the kept sequence: the p prefix tokens, then keep_idx."""
    prefix = torch.arange(num_prefix, device=keep_idx.device).expand(keep_idx.shape[0], -1)
    return torch.cat([prefix, keep_idx], dim=1)


def gather_kept(x, qkv, keep_idx, num_prefix=1):
    """The kept rows (prefix first) of x (B, T, C) and qkv (B, T, 3C), contiguous."""
    rows = kept_rows(keep_idx, num_prefix)
    x_kept = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    qkv_kept = qkv.gather(1, rows[..., None].expand(-1, -1, qkv.shape[-1]))
    return x_kept, qkv_kept


def random_keep_idx(batch, num_tokens, count, num_prefix, generator, device):
    """The random control: `count` patches per image drawn uniformly without replacement from
    p..T-1, ascending, (B, count) int64. Drawn on the CPU so that every device gets the same."""
    draws = torch.rand(batch, num_tokens - num_prefix, generator=generator)
    return (draws.argsort(dim=-1)[:, :count].sort(dim=-1).values + num_prefix).to(device)


def select_tokens(x, qkv, num_heads, config, num_prefix=1, class_token=True, scale=None,
                  generator=None):
    """keep_idx (B, k + m) for block input x (B, T, C) and its qkv (B, T, 3C), without copying
    any rows: for callers that take the kept rows from somewhere else (tokenprune.vlm).

    config.selection picks the rule ("score", "cls", "mmr": SPEC.md; "random": here, in torch on
    the CPU, for both backends)."""
    check_inputs(x, qkv, num_heads)  # the kernels would fail on a bad shape less clearly
    if config.selection == "random":
        return random_keep_idx(x.shape[0], x.shape[1], config.kept_patches, num_prefix,
                               generator, x.device)
    args = (x, qkv, num_heads, config.k_anchors, config.top_m, config.alpha, config.score_norm,
            num_prefix, class_token, scale)
    rule = dict(selection=config.selection, mmr_lambda=config.mmr_lambda)
    if resolve_backend(config.backend, x) == "triton":
        from .kernels import pipeline
        return pipeline.select_tokens(*args, **rule)
    return select_reference(*args, **rule)


def select_and_gather(x: torch.Tensor, qkv: torch.Tensor, num_heads: int, config: "PruneConfig",
                      num_prefix: int = 1, class_token: bool = True,
                      scale: Optional[float] = None,
                      generator: Optional[torch.Generator] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep_idx, x_kept, qkv_kept) for block input x (B, T, C) and its qkv (B, T, 3C).

    num_prefix, class_token and scale describe the tower as in `select_reference`; `generator`
    (a CPU torch.Generator) is used by the random control only."""
    check_inputs(x, qkv, num_heads)
    if (config.selection != "random" and resolve_backend(config.backend, x) == "triton"
            and not (torch.is_grad_enabled() and (x.requires_grad or qkv.requires_grad))):
        from .kernels import pipeline
        # The fused row copy; it has no backward, so in training the rows are gathered by torch.
        return pipeline.select_and_gather(x, qkv, num_heads, config.k_anchors, config.top_m,
                                          config.alpha, config.score_norm, num_prefix,
                                          class_token, scale, selection=config.selection,
                                          mmr_lambda=config.mmr_lambda)
    keep_idx = select_tokens(x, qkv, num_heads, config, num_prefix, class_token, scale, generator)
    return (keep_idx, *gather_kept(x, qkv, keep_idx, num_prefix))


def select_units(features: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 segment: Optional[torch.Tensor], scale: float, merge2: int, kept: int,
                 config: "PruneConfig", generator: Optional[torch.Generator] = None,
                 class_token: bool = False) -> torch.Tensor:
    """The `kept` units (kept,) int64, ascending, of one image whose patches are in unit order
    (tokenprune.reference.select_units_reference has the arguments); the first
    min(k_anchors, kept) are anchors. segment None: every patch attends to the whole image,
    which the kernels need; "auto" takes the reference for a segmented (windowed) block and an
    explicit "triton" is refused there. class_token: q and k hold a class token's row before
    the patches, whose attention scores them (InternVL's tiles)."""
    units = features.shape[0]
    if kept >= units:
        return torch.arange(units, device=features.device)
    if config.selection == "random":
        return random_keep_idx(1, units, kept, 0, generator, features.device)[0]
    anchors = min(config.k_anchors, kept)
    backend = resolve_backend(config.backend, features)
    if backend == "triton" and segment is not None:
        if config.backend == "triton":
            raise ValueError("backend='triton' needs the selecting block to attend to the whole "
                             "image; this one attends within windows: use backend='auto' or "
                             "'reference'")
        backend = "reference"
    if backend == "triton":
        from .kernels import pipeline
        return pipeline.select_units(features, q, k, scale, merge2, anchors, kept - anchors,
                                     config.selection, config.alpha, config.score_norm,
                                     config.mmr_lambda, class_token)
    from .reference import select_units_reference
    return select_units_reference(features, q, k, segment, scale, merge2, anchors,
                                  kept - anchors, config, class_token)
