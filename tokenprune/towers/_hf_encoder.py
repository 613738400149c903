"""What Hugging Face's CLIP and SigLIP image towers share: a vision model (`embeddings`,
`encoder.layers`, post-norm, pooling) whose encoder layers are pre-norm blocks (`layer_norm1`,
`self_attn` with separate `q_proj`/`k_proj`/`v_proj` and `out_proj`, `layer_norm2`, `mlp`).
The attention runs through transformers' own dispatch (`ALL_ATTENTION_FUNCTIONS` and the
model's `config._attn_implementation`), so `sdpa`, `eager` and the others keep working.

transformers records `output_hidden_states` / `output_attentions` with forward hooks on the
encoder layers and attention modules of its own classes. A PrunedBlock is neither and does not
call `self_attn`, so the adapter runs those hooks itself on the pruned path: the recorded
hidden states keep one entry per layer, those from the pruned layer on holding the kept tokens.
"""
import torch
import torch.nn.functional as F

from . import BlockAdapter, Tower, UnsupportedModelError


def run_forward_hooks(module, args, output):
    """Call `module`'s plain forward hooks as if it had returned `output` for `args`."""
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id not in module._forward_hooks_with_kwargs:
            hook(module, args, output)


class EncoderLayerAdapter(BlockAdapter):
    """A CLIPEncoderLayer / SiglipEncoderLayer; `eager_attention` is its modeling module's own
    eager function, the fall-back of transformers' dispatch."""

    def __init__(self, block, eager_attention):
        super().__init__(block)
        attn = block.self_attn
        if attn.num_heads * attn.head_dim != attn.embed_dim:
            raise UnsupportedModelError(
                f"tokenprune needs num_heads * head_dim == the block width, got "
                f"{attn.num_heads} * {attn.head_dim} != {attn.embed_dim}")
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.eager_attention = eager_attention

    def tokens(self, hidden_states, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("token pruning needs plain self-attention: attention_mask must be "
                             "None")
        return hidden_states, kwargs

    def qkv(self, x, kwargs):
        attn = self.block.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        # One GEMM over the concatenated weights gives the same rows as the three projections.
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if attn.q_proj.bias is not None else None
        return F.linear(self.block.layer_norm1(x), weight, bias)

    def attention_kwargs(self, attn, kwargs):
        """What the layer's attention module passes to the attention function besides q, k, v."""
        return kwargs

    def forward_kept(self, x_kept, qkv_kept, kwargs, training):
        block, attn = self.block, self.block.self_attn
        B, n, C = x_kept.shape
        q, k, v = qkv_kept.view(B, n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                          self.eager_attention)
        out, weights = attention(attn, q, k, v, None, scaling=attn.scale,
                                 dropout=attn.dropout if attn.training else 0.0,
                                 **self.attention_kwargs(attn, kwargs))
        out = attn.out_proj(out.reshape(B, n, C).contiguous())
        if attn._forward_hooks:  # output_attentions recording
            run_forward_hooks(attn, (block.layer_norm1(x_kept),), (out, weights))
        z = x_kept + out
        return z + block.mlp(block.layer_norm2(z))


class LayerHooks:
    """Forward hook of the PrunedBlock: on the pruned path, the original layer's forward hooks
    (transformers' hidden-state recording) see the pruned block's output. On the no-op path the
    original layer itself ran, hooks included. A plain object, so that deepcopy keeps the link."""

    def __init__(self, pruned):
        self.pruned = pruned

    def __call__(self, module, args, output):
        if self.pruned.last_keep_idx is not None:
            run_forward_hooks(self.pruned._original_block, args, output)


def from_transformers(obj):
    """Whether obj's class comes from transformers: checked before importing it, so that other
    towers never import transformers, and tokenprune works without it installed."""
    return type(obj).__module__.startswith("transformers.")


def hf_tower(vision, family, class_token):
    """The Tower of a CLIPVisionModel / SiglipVisionModel."""
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
    # The recording hooks go on the original layers now (transformers installs them lazily, on
    # the first output_hidden_states call), so that LayerHooks finds them after the swap.
    maybe_install_capturing_hooks(vision)
    config = vision.config
    grid = config.image_size // config.patch_size
    return Tower(module=vision, blocks=vision.encoder.layers, num_prefix=1 if class_token else 0,
                 class_token=class_token, grid_size=(grid, grid), family=family)
