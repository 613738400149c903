"""What timm's attention modules share: `Attention` (timm Block), `EvaAttention` and
`AttentionRope` (timm EvaBlock). Each projects to q, k, v (one packed `qkv` Linear, or EVA's
separate q/k/v biases, or separate `q_proj`/`k_proj`/`v_proj`), applies `q_norm`/`k_norm` per
head, then rotary embeddings on the patch tokens (Eva only), attends with `scale`, and ends
with `norm` (scale_norm), an optional sigmoid `gate` and `proj`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import UnsupportedModelError


def check_attention(attn):
    """Refuse what the packed (B, T, 3C) qkv cannot hold: grouped-query attention or an
    attention width other than the block's."""
    heads, head_dim = attn.num_heads, attn.head_dim
    dim = (attn.qkv if attn.qkv is not None else attn.q_proj).in_features
    kv_heads = getattr(attn, "num_kv_heads", heads)
    if kv_heads != heads:
        raise UnsupportedModelError(f"tokenprune cannot prune grouped-query attention "
                                    f"({type(attn).__name__} with num_kv_heads={kv_heads} != "
                                    f"num_heads={heads})")
    if heads * head_dim != dim:
        raise UnsupportedModelError(f"tokenprune needs num_heads * head_dim == the block width, "
                                    f"got {heads} * {head_dim} != {dim} in {type(attn).__name__}")


def project(attn, y):
    """[q | k | v] = the attention's projection of y (B, T, C), one GEMM, before any norm."""
    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is not None:  # EVA: k has no bias, a zero buffer
            return F.linear(y, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        return attn.qkv(y)
    # Separate projections: one GEMM over the concatenated weights gives the same rows.
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight for p in projections])
    if all(p.bias is None for p in projections):
        return F.linear(y, weight)
    bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                      for p in projections])
    return F.linear(y, weight, bias)


def rotate(t, rope, num_prefix, half):
    """timm's rotary embedding on the patch tokens of t (B, H, T, d); prefix tokens unrotated."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    return torch.cat([t[:, :, :num_prefix], apply_rot_embed_cat(t[:, :, num_prefix:], rope, half=half)],
                     dim=2)


def packed_qkv(attn, y, rope=None):
    """(B, T, 3C): q and k exactly as `attn` uses them (projection, q/k norm, rotary), and v."""
    qkv = project(attn, y)
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity) and rope is None:
        return qkv  # already packed as (3, H, d) per token
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        q = rotate(q, rope, attn.num_prefix_tokens, half).type_as(v)
        k = rotate(k, rope, attn.num_prefix_tokens, half).type_as(v)
    return torch.stack((q, k, v), dim=2).transpose(1, 3).reshape(B, T, 3 * attn.num_heads * attn.head_dim)


def attend(attn, qkv_kept, y_kept, training):
    """The attention branch's output on the kept rows, from their packed qkv; y_kept (the
    block's normed input rows) is read only by a gated attention."""
    B, n, _ = qkv_kept.shape
    q, k, v = qkv_kept.view(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if training else 0.0,
                                         scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(B, n, attn.num_heads * attn.head_dim))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(y_kept).sigmoid()
    return attn.proj_drop(attn.proj(out))
