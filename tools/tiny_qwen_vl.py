"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE models with random
weights and a processor made offline, for tests, benchmarks and CI.

    python tools/tiny_qwen_vl.py OUTDIR [--family qwen2_5_vl] [--size tiny|qwen2.5-vl-7b|qwen3.5-9b]

saves the *ForConditionalGeneration model and its processor with save_pretrained, so that both
load back with no network. From Python (tests/ and bench/ put tools/ on sys.path):

    from tiny_qwen_vl import build_qwen_vl
    model, processor = build_qwen_vl("qwen2_5_vl", "tiny")

Sizes:
- "tiny": 8-px patches (16 px for Qwen3-VL, whose learned position grid is 4 x 4 here) merged
  2 x 2, 2 vision blocks of width 32, a 2-layer language model of width 32 and a vocabulary of
  about 110 words; images are resized to multiples of 16 px (32 px for Qwen3-VL) between 256 and
  4096 pixels (1024 to 16384 for Qwen3-VL): for tests. Qwen2.5-VL's first block attends in
  32-px windows (2 x 2 units, so its rows are in window order), its last block to the whole
  image (as in the real model, whose last block is a full-attention block).
  Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE have Qwen3-VL's tower and sizes (Qwen3.5's without
  deepstack features); their MoE language models have 4 experts of width 16, 2 per token;
  Qwen3.5's two layers are a gated delta net (linear attention), then a full-attention layer.
- "qwen2.5-vl-7b": the real Qwen2.5-VL-7B-Instruct configuration, random weights in bfloat16
  (about 17 GB), for benchmarks only.
- "qwen3.5-9b": the real Qwen3.5-9B configuration (family qwen3_5), random weights in bfloat16
  (about 19 GB), for benchmarks only.

The tokenizer is tiny_llava's word-level vocabulary with Qwen's special tokens (<|im_start|>,
<|im_end|>, <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>); it adds nothing in
front of a text, as Qwen's does not. The chat template writes Qwen's
"<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>...<|im_end|>" layout.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_llava import PUNCTUATION, WORDS, make_model, save_pair, word_level_tokenizer  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# The families built on Qwen3-VL's vision tower: 16-px patches and a learned position grid.
QWEN3_TOWER = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# Each size but "tiny" is one family's real configuration.
SIZES = {"tiny": None, "qwen2.5-vl-7b": "qwen2_5_vl", "qwen3.5-9b": "qwen3_5"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]
ROLES = ["user", "assistant", "system"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    """A PreTrainedTokenizerFast over a word-level vocabulary with Qwen's special tokens."""
    return word_level_tokenizer(
        SPECIAL_TOKENS + ROLES + WORDS + PUNCTUATION, SPECIAL_TOKENS[1:7], CHAT_TEMPLATE,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        model_max_length=32768,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>",
                              "vision_end_token": "<|vision_end|>"})


def _tiny_text(family, vocab_size):
    shapes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  vocab_size=vocab_size)
    # Head size 8: 4 rotary frequencies, split over the temporal, height and width sections. A
    # base of 10 (the real models use 1e6 over 64 frequencies) gives every section a frequency
    # high enough that a position one off changes the logits well beyond rounding.
    rope = dict(rope_type="default", rope_theta=10.0, mrope_section=[2, 1, 1])
    if family in ("qwen3_5", "qwen3_5_moe"):
        # One gated-delta-net (linear attention) layer, then one full-attention layer, the only
        # one that reads positions: a quarter of its head size 32 is rotated (8 of 32, as 64 of
        # the real model's 256).
        shapes.update(head_dim=32, layer_types=["linear_attention", "full_attention"],
                      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                      linear_value_head_dim=8, linear_conv_kernel_dim=4)
        rope.update(mrope_interleaved=True, partial_rotary_factor=0.25)
        if family == "qwen3_5_moe":
            shapes.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          shared_expert_intermediate_size=16)
        return dict(shapes, rope_parameters=rope)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        if family == "qwen3_vl_moe":  # 4 experts of width 16, 2 per token, in every layer
            shapes.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
        return dict(shapes, head_dim=8, rope_parameters=dict(rope, mrope_interleaved=True))
    return dict(shapes, rope_parameters=rope)


def _tiny_vision(family):
    if family == "qwen2_vl":
        return dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                    patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    common = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                  out_hidden_size=32, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        return dict(common, patch_size=8, window_size=32, fullatt_block_indexes=[1])
    if family in ("qwen3_5", "qwen3_5_moe"):  # Qwen3-VL's tower without deepstack features
        return dict(common, patch_size=16, num_position_embeddings=16)
    return dict(common, patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0])


def _qwen2_5_vl_7b(vocab_size):
    """Qwen2.5-VL-7B-Instruct's shapes (its config.json), with this tokenizer's ids."""
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                rms_norm_eps=1e-6, vocab_size=152064,
                rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                     mrope_section=[16, 24, 24]))
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  tokens_per_second=2)
    return text, vision


def _qwen3_5_9b(vocab_size):
    """Qwen3.5-9B's shapes (its config.json): 32 layers, every fourth full attention (8), the
    others gated delta nets; a 27-block tower of width 1152 without deepstack features. About
    9.4 billion parameters (19 GB in bfloat16; its multi-token-prediction head is not built)."""
    text = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                num_attention_heads=16, num_key_value_heads=4, head_dim=256,
                max_position_embeddings=262144, rms_norm_eps=1e-6, vocab_size=248320,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8,
                linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                linear_num_key_heads=16, linear_num_value_heads=32, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000000,
                                     mrope_section=[11, 11, 10], mrope_interleaved=True,
                                     partial_rotary_factor=0.25))
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  num_position_embeddings=2304, out_hidden_size=4096, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2)
    return text, vision


def _classes(family):
    import transformers
    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL",
              "qwen3_vl_moe": "Qwen3VLMoe", "qwen3_5": "Qwen3_5",
              "qwen3_5_moe": "Qwen3_5Moe"}[family]
    # Qwen3-VL-MoE and Qwen3.5 (dense and MoE) have no processor of their own: Qwen3-VL's.
    processor = "Qwen3VL" if family in QWEN3_TOWER else prefix
    return (getattr(transformers, f"{prefix}Config"),
            getattr(transformers, f"{prefix}ForConditionalGeneration"),
            getattr(transformers, f"{processor}Processor"))


def build_processor(family, tokenizer=None, patch_size=8, merge_size=2, min_pixels=256,
                    max_pixels=4096):
    """The family's processor over the tiny tokenizer, its image processor resizing images to
    multiples of patch_size * merge_size px with min_pixels..max_pixels pixels."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    tokenizer = tokenizer or build_tokenizer()
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=patch_size,
                                            merge_size=merge_size, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=patch_size,
                                            merge_size=merge_size, temporal_patch_size=2)
    if family in QWEN3_TOWER:
        from transformers import Qwen3VLVideoProcessor
        video_processor = Qwen3VLVideoProcessor(size=size, patch_size=patch_size,
                                                merge_size=merge_size, temporal_patch_size=2)
    return _classes(family)[2](image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_qwen_vl(family="qwen2_5_vl", size="tiny", seed=0, dtype=None, attn_implementation=None,
                  device=None, vision=None):
    """(model, processor): the family's *ForConditionalGeneration with random weights drawn from
    `seed`, in eval mode (bfloat16 by default for "qwen2.5-vl-7b", else float32), made directly on
    `device` (default: the CPU), and its processor, both made offline. `vision`: entries that
    replace the vision config's (say depth=4, fullatt_block_indexes=[1, 3])."""
    import torch
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if size != "tiny" and family != SIZES[size]:
        raise ValueError(f"size {size!r} is a {SIZES[size]} configuration, got family "
                         f"{family!r}")
    tokenizer = build_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    if size == "tiny":
        text, vision_config = _tiny_text(family, len(tokenizer)), _tiny_vision(family)
    else:
        text, vision_config = {"qwen2.5-vl-7b": _qwen2_5_vl_7b, "qwen3.5-9b": _qwen3_5_9b}[size](
            len(tokenizer))
    vision = dict(vision_config, **(vision or {}))
    text.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None)
    config_class, model_class, _ = _classes(family)
    config = config_class(text_config=text, vision_config=vision, **ids)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if dtype is None:
        dtype = torch.float32 if size == "tiny" else torch.bfloat16
    model = make_model(model_class, config, seed, dtype, device, tokenizer)
    if size == "tiny":
        patch = vision["patch_size"]
        processor = build_processor(family, tokenizer, patch, 2, min_pixels=(2 * patch) ** 2,
                                    max_pixels=(2 * patch) ** 2 * 16)
    else:
        patch = vision["patch_size"]
        processor = build_processor(family, tokenizer, patch, 2, min_pixels=(2 * patch) ** 2 * 4,
                                    max_pixels=(2 * patch) ** 2 * 16384)
    return model, processor


def save_qwen_vl(outdir, family="qwen2_5_vl", size="tiny", seed=0):
    """Build and save_pretrained the model and processor into `outdir`; returns outdir."""
    return save_pair(outdir, *build_qwen_vl(family, size, seed))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder to save the model and processor in")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl",
                        help="default %(default)s")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    save_qwen_vl(args.outdir, args.family, args.size, args.seed)
    print(f"saved a {args.size} {args.family} model with random weights in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
