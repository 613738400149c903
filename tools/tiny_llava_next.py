"""LLaVA-NeXT and LLaVA-OneVision models with random weights and a processor made offline, for
tests, benchmarks and CI.

    python tools/tiny_llava_next.py OUTDIR [--family llava_onevision] [--size tiny|REAL]

saves the *ForConditionalGeneration model and its processor with save_pretrained, so that both
load back with no network. From Python (tests/ and bench/ put tools/ on sys.path):

    from tiny_llava_next import build_llava_next
    model, processor = build_llava_next("llava_onevision", "tiny")

Sizes:
- "tiny": 32-px tiles in 8-px patches (4 x 4 = 16 patches a tile), 2 vision blocks of width 32,
  a 2-layer language model of width 32 and tiny_llava's vocabulary. LLaVA-NeXT: a CLIP tower
  (a class token), feature layer -2, strategy "default", a Llama; tile grids 1 x 2, 2 x 1, 2 x 2,
  1 x 3 and 3 x 1. LLaVA-OneVision: a SigLIP tower (no class token), feature layer -1, strategy
  "full", a Qwen2, "anyres_max_9"; tile grids from 1 x 1 to 3 x 3 (never downsampled: at most
  9 tiles of patches) and 4 x 4 (downsampled by transformers, 16 x 16 -> 12 x 12 patches).
- "llava-v1.6-mistral-7b" (LLaVA-NeXT): llava-hf/llava-v1.6-mistral-7b-hf's shapes, CLIP
  ViT-L/14 at 336 px (576 patches a tile, 5 tile grids up to 1008 px), Mistral-7B; random
  weights in bfloat16, about 15 GB.
- "llava-onevision-qwen2-7b" (LLaVA-OneVision): llava-hf/llava-onevision-qwen2-7b-ov-hf's
  shapes, SigLIP-so400m at 384 px (27 x 27 = 729 patches a tile, the 36 tile grids up to
  2304 px), Qwen2-7B; random weights in bfloat16, about 16 GB.
The two real sizes are written from the checkpoints' published config.json files (not checked
offline here); they are for GPU benchmarks only.

The tokenizer is tiny_llava's (word-level; OneVision's adds <video>), with its chat template.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_llava import (CHAT_TEMPLATE, _text_config, _vision_config, build_tokenizer,  # noqa
                        make_model, save_pair)

FAMILIES = ("llava_next", "llava_onevision")
SIZES = ("tiny", "llava-v1.6-mistral-7b", "llava-onevision-qwen2-7b")
REAL = {"llava-v1.6-mistral-7b": "llava_next", "llava-onevision-qwen2-7b": "llava_onevision"}

# Tile grids (height, width in px), as image_grid_pinpoints.
TINY_PINPOINTS = {
    "llava_next": [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],
    "llava_onevision": [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [96, 96],
                        [128, 128]],
}
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _configs(family, size, tokenizer):
    """(vision config, text config, pinpoints, tile px, patch px) of a family and size."""
    from transformers import MistralConfig, Qwen2Config, SiglipVisionConfig
    pad = tokenizer.pad_token_id
    if size == "tiny":
        vision = _vision_config("clip" if family == "llava_next" else "siglip", "tiny")
        if family == "llava_next":
            text = _text_config("tiny", len(tokenizer), pad)
        else:
            text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, vocab_size=len(tokenizer),
                               pad_token_id=pad, bos_token_id=1, eos_token_id=2,
                               tie_word_embeddings=False)
        return vision, text, TINY_PINPOINTS[family], 32, 8
    if size == "llava-v1.6-mistral-7b":
        vision = _vision_config("clip", "llava-1.5-7b")  # CLIP ViT-L/14 at 336 px
        text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32064,
                             max_position_embeddings=32768, rms_norm_eps=1e-5,
                             rope_parameters=dict(rope_type="default", rope_theta=1e6),
                             sliding_window=None, pad_token_id=pad, bos_token_id=1,
                             eos_token_id=2, tie_word_embeddings=False)
        return vision, text, NEXT_PINPOINTS, 336, 14
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14,
                                vision_use_head=False)
    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152128,
                       max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_parameters=dict(rope_type="default", rope_theta=1e6),
                       pad_token_id=pad, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)
    return vision, text, ONEVISION_PINPOINTS, 384, 14


def build_processor(family, tokenizer, pinpoints, tile, patch):
    """The family's processor over `tokenizer`: tiles of `tile` px in `patch`-px patches."""
    import transformers
    if family == "llava_next":
        image_processor = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=pinpoints)
        return transformers.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
            vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1)
    image_processor = transformers.LlavaOnevisionImageProcessor(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    video_processor = transformers.LlavaOnevisionVideoProcessor(
        size={"height": tile, "width": tile})
    return transformers.LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(tile // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_9")


def build_llava_next(family="llava_next", size="tiny", seed=0, dtype=None,
                     attn_implementation=None, device=None):
    """(model, processor): the family's *ForConditionalGeneration with random weights drawn from
    `seed`, in eval mode (bfloat16 by default for the real sizes, else float32), made directly
    on `device` (default: the CPU), and its processor, both made offline."""
    import torch
    import transformers
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if size != "tiny" and REAL[size] != family:
        raise ValueError(f"size {size!r} is a {REAL[size]} configuration, got family {family!r}")
    tokenizer = build_tokenizer(video=family == "llava_onevision")
    vision, text, pinpoints, tile, patch = _configs(family, size, tokenizer)
    ids = dict(image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    if family == "llava_next":
        config_class, model_class = (transformers.LlavaNextConfig,
                                     transformers.LlavaNextForConditionalGeneration)
        options = dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=(tile // patch) ** 2)
    else:
        config_class, model_class = (transformers.LlavaOnevisionConfig,
                                     transformers.LlavaOnevisionForConditionalGeneration)
        ids["video_token_index"] = tokenizer.convert_tokens_to_ids("<video>")
        options = dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                       vision_aspect_ratio="anyres_max_9")
    config = config_class(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                          projector_hidden_act="gelu", **ids, **options)
    config.pad_token_id = tokenizer.pad_token_id
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if dtype is None:
        dtype = torch.float32 if size == "tiny" else torch.bfloat16
    model = make_model(model_class, config, seed, dtype, device, tokenizer)
    return model, build_processor(family, tokenizer, pinpoints, tile, patch)


def save_llava_next(outdir, family="llava_next", size="tiny", seed=0):
    """Build and save_pretrained the model and processor into `outdir`; returns outdir."""
    return save_pair(outdir, *build_llava_next(family, size, seed))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder to save the model and processor in")
    parser.add_argument("--family", choices=FAMILIES, default="llava_next",
                        help="default %(default)s")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    save_llava_next(args.outdir, args.family, args.size, args.seed)
    print(f"saved a {args.size} {args.family} model with random weights in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
