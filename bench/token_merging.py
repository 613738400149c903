"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), written
here from the paper's description as a baseline for tokenprune's schedules (issue 23). A
benchmark tool, not part of the package; ToMe's own code is not used.

In every block, as the paper describes it:
- proportional attention: each key's logit gets log(s), s the number of original tokens the key
  stands for, so that a merged token weighs as much as the tokens it replaced;
- then bipartite soft matching on the keys (averaged over heads): the tokens go alternately into
  sets A and B, each A token's edge is its most similar B token (cosine), the r most similar
  edges are merged (the B token becomes the size-weighted average, the sizes add), the class
  token is never merged;
- then the MLP, on the fewer tokens.
So r tokens fewer leave every block (at most half of those that reach it). Attention runs
through torch's scaled_dot_product_attention with the log-size bias as an additive mask.

    state = apply_token_merging(model, r=13)   # OpenCLIP or timm VisionTransformer, class token
    model(images); state["tokens"]             # the token count after each block
    remove_token_merging(model)
"""
import torch
import torch.nn.functional as F

from tokenprune.towers import find_tower

ATTRIBUTE = "_token_merging"


def match(metric, r, protect_first):
    """Bipartite soft matching of metric (B, T, d): (unmerged A rows (B, |A| - r) ascending, the
    merged A rows (B, r), the B rows they merge into (B, r)), as indices into A (even tokens)
    and B (odd tokens). With protect_first, token 0 (the class token, in A) is never merged."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)       # (B, |A|, |B|)
    if protect_first:
        scores[:, 0] = float("-inf")
    edge, partner = scores.max(dim=-1)                               # (B, |A|)
    order = edge.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :r]
    return order[:, r:].sort(dim=-1).values, merged, partner.gather(1, merged)


def merge(x, size, unmerged, merged, partner):
    """x (B, T, C) and size (B, T, 1) after the matching: the unmerged A rows, then every B row,
    each merged B row the size-weighted average of itself and the A rows merged into it."""
    C = x.shape[-1]
    total = x * size
    a, b = total[:, ::2], total[:, 1::2]
    size_a, size_b = size[:, ::2], size[:, 1::2]
    into = partner[..., None]
    b = b.scatter_add(1, into.expand(-1, -1, C), a.gather(1, merged[..., None].expand(-1, -1, C)))
    size_b = size_b.scatter_add(1, into, size_a.gather(1, merged[..., None]))
    new_size = torch.cat([size_a.gather(1, unmerged[..., None]), size_b], dim=1)
    new_x = torch.cat([a.gather(1, unmerged[..., None].expand(-1, -1, C)), b], dim=1)
    return new_x / new_size, new_size


class _Parts:
    """One block's pieces: the packed qkv, the attention branch after SDPA, the MLP branch."""

    def __init__(self, block):
        from open_clip.transformer import ResidualAttentionBlock
        self.block = block
        if isinstance(block, ResidualAttentionBlock):
            if not block.attn.batch_first:
                raise ValueError("token merging here needs a batch-first OpenCLIP transformer")
            self.kind, self.heads, self.scale = "openclip", block.attn.num_heads, None
        elif hasattr(block, "attn") and hasattr(block.attn, "qkv") and hasattr(block, "norm1"):
            self.kind, self.heads, self.scale = "timm", block.attn.num_heads, block.attn.scale
        else:
            raise ValueError(f"token merging here knows OpenCLIP's ResidualAttentionBlock and "
                             f"timm's Block, not {type(block).__name__}")

    def qkv(self, x):
        block = self.block
        if self.kind == "openclip":
            return F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
        from tokenprune.towers._timm_attention import packed_qkv
        return packed_qkv(block.attn, block.norm1(x))

    def attention_out(self, o):
        block = self.block
        if self.kind == "openclip":
            return block.ls_1(block.attn.out_proj(o))
        attn = block.attn
        return block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(o)))))

    def mlp(self, x):
        block = self.block
        if self.kind == "openclip":
            return block.ls_2(block.mlp(block.ln_2(x)))
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _merging_forward(parts, state):
    def forward(x, *args, **kwargs):
        B, T, C = x.shape
        size = state["size"]
        if size is None:
            size = x.new_ones(B, T, 1)
        q, k, v = parts.qkv(x).view(B, T, 3, parts.heads, C // parts.heads).permute(2, 0, 3, 1, 4)
        bias = size.log().view(B, 1, 1, T).to(q.dtype)                   # proportional attention
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.scale)
        x = x + parts.attention_out(o.transpose(1, 2).reshape(B, T, C))
        r = min(state["r"], (T - state["protect_first"]) // 2)  # at most half of them
        if r > 0:
            x, size = merge(x, size, *match(k.mean(dim=1), r, state["protect_first"]))
        state["size"] = size
        state["tokens"].append(x.shape[1])
        return x + parts.mlp(x)
    return forward


def merging_tokens(tokens, blocks, r):
    """The tokens each block's attention runs on under merging at a constant r (the merge comes
    after the attention; at most half of the tokens but the class token)."""
    out = []
    for _ in range(blocks):
        out.append(tokens)
        tokens -= min(r, (tokens - 1) // 2)
    return out


def schedule_tokens(tokens, blocks, schedule):
    """The tokens each block runs on under a tokenprune schedule of (block index, k_anchors,
    top_m) stages: a stage's block already runs on the class token and the patches it keeps."""
    out, stages = [], {block: k + m for block, k, m in schedule}
    for block in range(blocks):
        tokens = 1 + stages[block] if block in stages else tokens
        out.append(tokens)
    return out


def apply_token_merging(model, r):
    """Merge r tokens in every block of the model's tower (OpenCLIP or timm VisionTransformer
    with a class token, or timm without prefix tokens). Returns the state: "r" (may be changed
    between calls), "tokens" (the count after each block of the last forward), "size"."""
    if not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an integer >= 0, got {r!r}")
    tower = find_tower(model)
    if tower.num_prefix != int(tower.class_token):
        raise ValueError("token merging here protects one class token only; this tower has "
                         f"{tower.num_prefix} prefix tokens")
    remove_token_merging(model)
    state = {"r": r, "size": None, "tokens": [], "protect_first": tower.class_token}

    def reset(module, args):
        state["size"], state["tokens"] = None, []
    hooks = [tower.module.register_forward_pre_hook(reset)]
    for block in tower.blocks:
        block.forward = _merging_forward(_Parts(block), state)
    setattr(model, ATTRIBUTE, (tower, hooks, state))
    return state


def remove_token_merging(model):
    """Undo apply_token_merging; returns whether there was something to undo."""
    found = getattr(model, ATTRIBUTE, None)
    if found is None:
        return False
    tower, hooks, _ = found
    for hook in hooks:
        hook.remove()
    for block in tower.blocks:
        del block.forward  # the instance attribute: the class's forward again
    delattr(model, ATTRIBUTE)
    return True
