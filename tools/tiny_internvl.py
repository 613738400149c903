"""InternVL models (transformers' own InternVLForConditionalGeneration, model_type "internvl")
with random weights and a processor made offline, for tests, benchmarks and CI.

    python tools/tiny_internvl.py OUTDIR [--size tiny|internvl3-8b]

saves the model and its InternVLProcessor with save_pretrained, so that both load back with no
network. From Python (tests/ and bench/ put tools/ on sys.path):

    from tiny_internvl import build_internvl
    model, processor = build_internvl("tiny")

Sizes:
- "tiny": 32-px tiles in 4-px patches (8 x 8 = 64 patches and a class token per tile, which the
  pixel shuffle turns into 4 x 4 = 16 image tokens), 2 vision blocks of width 32, a 2-layer
  Qwen2 language model of width 32 and a vocabulary of about 110 words. The image processor
  cuts an image into 1 to 4 tiles of 32 px (the grid closest to its aspect ratio) and adds a
  thumbnail when it cuts more than one: a 32 x 32 image is 1 tile, 64 wide x 32 high is 2 + 1,
  64 x 64 is 4 + 1. For tests.
- "internvl3-8b": the real InternVL3-8B-hf configuration (InternViT-300M at 448 px in 14-px
  patches, 256 image tokens per tile, up to 12 tiles and a thumbnail; Qwen2.5-7B), random weights
  in bfloat16 (about 16 GB), for GPU benchmarks only.

The tokenizer is tiny_llava's word-level vocabulary with Qwen's chat tokens and InternVL's image
tokens (<img>, </img>, <IMG_CONTEXT>, <video>); it adds nothing in front of a text. The chat
template writes "<|im_start|>user\\n<IMG_CONTEXT>\\n...<|im_end|>\\n<|im_start|>assistant\\n", which
the processor expands to "<img>" + 16 <IMG_CONTEXT> per tile + "</img>".
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_llava import PUNCTUATION, WORDS, make_model, save_pair  # noqa: E402

SIZES = ("tiny", "internvl3-8b")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                  "<IMG_CONTEXT>", "<video>", "<unk>"]
ROLES = ["user", "assistant", "system"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    """A PreTrainedTokenizerFast over a word-level vocabulary with InternVL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ROLES + WORDS + PUNCTUATION)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<unk>", padding_side="left", model_max_length=32768,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:7]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _tiny(vocab_size):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=[32, 32], patch_size=[4, 4])
    # A rotary base of 10 (the real models use 1e6): a position one off changes the logits
    # well beyond rounding, so that a test can tell a wrong position.
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                vocab_size=vocab_size, rope_parameters=dict(rope_type="default", rope_theta=10.0))
    return vision, text, dict(tile=32, max_patches=4)


def _internvl3_8b():
    """InternVL3-8B-hf's shapes (InternViT-300M-448px-V2.5 and Qwen2.5-7B)."""
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14],
                  norm_type="layer_norm", use_qk_norm=False, layer_scale_init_value=0.1,
                  use_mean_pooling=True)
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rms_norm_eps=1e-6, vocab_size=151674,
                rope_parameters=dict(rope_type="default", rope_theta=1e6))
    return vision, text, dict(tile=448, max_patches=12)


def build_processor(tokenizer=None, tile=32, max_patches=4, image_seq_length=16):
    """InternVLProcessor over the tiny tokenizer: images cut into 1..max_patches tiles of
    `tile` px (and a thumbnail when more than one), image_seq_length tokens per tile."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor
    tokenizer = tokenizer or build_tokenizer()
    size = {"height": tile, "width": tile}
    image_processor = GotOcr2ImageProcessor(
        size=size, crop_to_patches=True, min_patches=1, max_patches=max_patches,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    video_processor = InternVLVideoProcessor(size=size)
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                             video_processor=video_processor, image_seq_length=image_seq_length,
                             chat_template=CHAT_TEMPLATE)


def build_internvl(size="tiny", seed=0, dtype=None, attn_implementation=None, device=None,
                   vision=None):
    """(model, processor): an InternVLForConditionalGeneration with random weights drawn from
    `seed`, in eval mode (bfloat16 by default for "internvl3-8b", else float32), made directly on
    `device` (default: the CPU), and its InternVLProcessor, both made offline. `vision`: entries
    that replace the vision config's (say use_qk_norm=True, norm_type="rms_norm")."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    tokenizer = build_tokenizer()
    if size == "tiny":
        vision_config, text, tiling = _tiny(len(tokenizer))
    else:
        vision_config, text, tiling = _internvl3_8b()
    vision_config = dict(vision_config, **(vision or {}))
    text.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None, model_type="qwen2")
    patches = (vision_config["image_size"][0] // vision_config["patch_size"][0]) ** 2
    image_seq_length = patches // 4  # the pixel shuffle: 2 x 2 patches a token
    config = InternVLConfig(
        vision_config=vision_config, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=size == "tiny")
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if dtype is None:
        dtype = torch.float32 if size == "tiny" else torch.bfloat16
    model = make_model(InternVLForConditionalGeneration, config, seed, dtype, device, tokenizer)
    processor = build_processor(tokenizer, tiling["tile"], tiling["max_patches"],
                                image_seq_length)
    return model, processor


def save_internvl(outdir, size="tiny", seed=0, **options):
    """Build and save_pretrained the model and processor into `outdir`; returns outdir."""
    return save_pair(outdir, *build_internvl(size, seed, **options))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder to save the model and processor in")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    save_internvl(args.outdir, args.size, args.seed)
    print(f"saved a {args.size} InternVL model with random weights in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
