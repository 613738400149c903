"""Selection alone, from the block input X (B, T, C) to the kept indices and kept tokens.

Providers (one group per token count, so pytest-benchmark shows them side by side):
- hook: the seed's approach (hook_baseline.py): the block's attention with need_weights=True
  captured through hooks, then the SPEC selection in PyTorch on the head-averaged weights.
- reference: tokenprune's PyTorch reference, `select_and_gather(backend="reference")`.
- triton: tokenprune's Triton kernels, `select_and_gather(backend="triton")` (CUDA only).
- qkv: `in_proj(ln_1(X))` alone, the part of the two above that the pruned block needs for
  its attention anyway (it reuses those Q, K, V rows); report.py shows the speedup without it.
Every provider starts from X, so tokenprune's timings include `in_proj(ln_1(X))` exactly as the
pruned block computes it; the hook baseline's include what nn.MultiheadAttention computes
alongside the weights it returns (it has no way to return the weights alone).
The no-class-token shapes (SigLIP-like, p=0) run the same OpenCLIP block with the tower's anchor
rule: the selection's cost depends on the shapes and the rule, not on the block's family.
"""
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from hook_baseline import HookSelector
from tokenprune import PruneConfig, select_and_gather


def test_selection(selection_case, env, run_benchmark):
    case = selection_case
    if case.provider == "triton" and env.triton_skip_reason:
        pytest.skip(env.triton_skip_reason)
    batch = env.selection_batch
    torch.manual_seed(0)
    block = ResidualAttentionBlock(case.channels, case.heads).to(env.device, env.dtype).eval()
    x = torch.randn(batch, case.tokens, case.channels, device=env.device, dtype=env.dtype)
    config = PruneConfig(k_anchors=env.k_anchors, top_m=env.top_m,
                         backend="triton" if case.provider == "triton" else "reference")

    if case.provider == "hook":
        selector = HookSelector(block)

        def select():
            with torch.inference_mode():
                selector(x, config.k_anchors, config.top_m, config.alpha, config.score_norm,
                         case.num_prefix, case.class_token)
            env.sync()
    else:
        attn = block.attn

        def select():
            with torch.inference_mode():
                qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
                if case.provider != "qkv":
                    select_and_gather(x, qkv, attn.num_heads, config, case.num_prefix,
                                      case.class_token)
            env.sync()

    run_benchmark(select, f"selection {case.shape} T={case.tokens} B={batch}", batch,
                  kind="selection", provider=case.provider, shape=case.shape, tokens=case.tokens,
                  channels=case.channels, heads=case.heads, k=config.k_anchors, m=config.top_m,
                  kept_tokens=case.num_prefix + config.kept_patches,
                  num_prefix=case.num_prefix, class_token=case.class_token,
                  backend=(env.resolve(config.backend)
                           if case.provider in ("reference", "triton") else None))
