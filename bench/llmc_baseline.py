"""The llmc / FasterVLM-style baseline that bench/bench_vlm.py compares prune_image_tokens with.

The published training-free pruners for LLaVA (FasterVLM, VisionZip, VisPruner, and ModelTC's
llmc toolkit that reimplements them) get the vision tower's attention by running it with
`output_attentions=True`. That needs eager attention in the tower and keeps every layer's
(H, T, T) map; they then select the image tokens in PyTorch and run the language model one
sample at a time. This file does the same with tokenprune's selection, so that the benchmark
compares the two ways of computing one selection, not two selections:

- the vision tower runs in eager attention at batch 1 with output_attentions=True and
  output_hidden_states=True;
- the selection is SPEC's (`tokenprune.reference.select_from_attention`) on the head-averaged
  attention of the block whose output is LLaVA's feature layer, and that block's input;
- the kept rows of the feature layer go through the projector into the prompt's k + m image
  placeholders, and the language model runs (prefill, then decoding) at batch 1.

Only what LLaVA-1.5 uses is covered: one feature layer, strategy "default". Not part of the
package.
"""
import inspect
from contextlib import contextmanager

import torch

from tokenprune.reference import select_from_attention


@contextmanager
def eager_attention(config):
    """The tower's attention in eager mode while inside (attention maps need it)."""
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


class LlmcBaseline:
    """prefill() and decode() of a LlavaForConditionalGeneration, one sample at a time, with
    the image tokens selected from attention maps. The model itself is not changed."""

    def __init__(self, model, k_anchors, top_m, alpha=0.5, score_norm="none"):
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("the baseline takes one vision_feature_layer, got "
                             f"{config.vision_feature_layer!r}")
        if config.vision_feature_select_strategy != "default":
            raise ValueError("the baseline takes vision_feature_select_strategy 'default', got "
                             f"{config.vision_feature_select_strategy!r}")
        self.model = model
        self.k_anchors, self.top_m = k_anchors, top_m
        self.alpha, self.score_norm = alpha, score_norm
        # hidden_states[i] is block i - 1's output, so the feature layer is made by block
        # `layer - 1`, whose input is hidden_states[layer - 1] and whose map is attentions[...].
        depth = config.vision_config.num_hidden_layers
        self.layer = config.vision_feature_layer % (depth + 1)
        if self.layer == 0:
            raise ValueError("vision_feature_layer 0 (the embeddings) is no block's output")
        # CLIP: row 0 is the class token. SigLIP has none; "default" still drops row 0, so it
        # is never chosen and the anchors come from the attention each patch receives.
        self.class_token = config.vision_config.model_type == "clip_vision_model"

    @property
    def image_tokens(self):
        return self.k_anchors + self.top_m

    def image_features(self, pixel_values):
        """(1, k + m, text width): the projected kept rows of one image (pixel_values (1, ...))."""
        model = self.model
        tower = model.model.vision_tower
        with eager_attention(tower.config):
            out = tower(pixel_values, output_attentions=True, output_hidden_states=True,
                        return_dict=True)
        x = out.hidden_states[self.layer - 1]
        P = out.attentions[self.layer - 1].float().mean(dim=1)  # (1, T, T), heads averaged
        keep_idx = select_from_attention(P, x, self.k_anchors, self.top_m, self.alpha,
                                         self.score_norm, num_prefix=1,
                                         class_token=self.class_token)
        rows = out.hidden_states[self.layer].gather(
            1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        return model.model.multi_modal_projector(rows)

    def prefill_one(self, input_ids, pixel_values, attention_mask):
        """(first token (1, 1), cache, attention mask) for one sample: its image features
        placed in the prompt's image placeholders, then the language model over the prompt."""
        model = self.model
        features = self.image_features(pixel_values)
        embeds = model.get_input_embeddings()(input_ids)
        slots = (input_ids == model.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
        out = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True,
                    logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values, attention_mask

    @torch.no_grad()
    def prefill(self, input_ids, pixel_values, attention_mask):
        """prefill_one for every sample of the batch, in turn (as the tools it stands for)."""
        return [self.prefill_one(input_ids[i:i + 1], pixel_values[i:i + 1],
                                 attention_mask[i:i + 1]) for i in range(input_ids.shape[0])]

    @torch.no_grad()
    def decode(self, states, steps):
        """`steps` greedy tokens after each prefill state, one sample at a time; the tokens."""
        return [decode_steps(self.model, *state, steps) for state in states]


def _cache_argument(model):
    """transformers renamed forward's `past_key_values` to `cache` (5.2x; the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_steps(model, token, cache, attention_mask, steps):
    """`steps` greedy decoding steps from a prefilled `cache` (changed in place), starting with
    `token` (B, 1); returns the tokens (B, steps)."""
    tokens = []
    ones = attention_mask.new_ones(attention_mask.shape[0], 1)
    name = _cache_argument(model)
    for _ in range(steps):
        attention_mask = torch.cat([attention_mask, ones], dim=1)
        out = model(input_ids=token, attention_mask=attention_mask, **{name: cache},
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)
