"""Gemma 3 models with random weights and a processor made offline, for tests, benchmarks and CI.

    python tools/tiny_gemma3.py OUTDIR [--size tiny|gemma-3-4b]

saves a Gemma3ForConditionalGeneration and its Gemma3Processor with save_pretrained, so that both
load back with no network. From Python (tests/ and bench/ put tools/ on sys.path):

    from tiny_gemma3 import build_gemma3
    model, processor = build_gemma3("tiny")

Sizes:
- "tiny": a 32-px image in 4-px patches (an 8 x 8 grid of 64 patches), average-pooled 2 x 2 into
  16 image tokens per image (mm_tokens_per_image=16, as 4096 patches into 256 in the real
  model); a SigLIP tower of 2 blocks of width 32; a Gemma 3 language model of 2 layers of width
  32 (a sliding-window layer with a window of 8 tokens, then a full-attention layer, so that the
  window matters on the test prompts) and a vocabulary of about 110 words: for tests. Its rotary
  bases are 10 (the real model's 1e4 and 1e6 over 128 frequencies): every frequency of the tiny
  head size then turns enough that a position one off changes the logits well beyond rounding.
- "gemma-3-4b": the real google/gemma-3-4b-it configuration (SigLIP at 896 px in 14-px patches,
  4096 patches pooled into 256 image tokens; a 34-layer language model), random weights in
  bfloat16 (about 8.6 GB), for GPU benchmarks only.

The tokenizer is tiny_llava's word-level vocabulary with Gemma's special tokens (<bos>, <eos>,
<start_of_turn>, <end_of_turn>, <start_of_image>, <end_of_image>, <image_soft_token>); it adds
nothing in front of a text, and the chat template writes <bos> and Gemma's
"<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n" layout, with an image entry as
<start_of_image>, which the processor expands to <start_of_image>, the image tokens and
<end_of_image>. Pan-and-scan is the processor's call option, as for the real model:
`processor(..., do_pan_and_scan=True, pan_and_scan_min_crop_size=16)` crops a wide or tall tiny
image into up to 4 extra images.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_llava import PUNCTUATION, WORDS, make_model, save_pair, word_level_tokenizer  # noqa: E402

SIZES = ("tiny", "gemma-3-4b")
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
ROLES = ["user", "model", "system"]

# Gemma's layout: a system message goes in front of the first user turn; an image entry becomes
# <start_of_image> (the processor's image token), which the processor expands.
CHAT_TEMPLATE = (
    "{{ '<bos>' }}"
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{% set system.text = message['content'] + ' ' %}"
    "{% else %}{% set system.text = message['content'][0]['text'] + ' ' %}{% endif %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
    " + '\n' + system.text }}{% set system.text = '' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_tokenizer():
    """A PreTrainedTokenizerFast over a word-level vocabulary with Gemma's special tokens."""
    return word_level_tokenizer(
        SPECIAL_TOKENS + ROLES + WORDS + PUNCTUATION, SPECIAL_TOKENS[4:], CHAT_TEMPLATE,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="left",
        model_max_length=8192,
        extra_special_tokens={"image_token": "<image_soft_token>",
                              "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})


def _tiny(vocab_size):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                max_position_embeddings=4096, vocab_size=vocab_size, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10.0),
                                 "full_attention": dict(rope_type="default", rope_theta=10.0)})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=4, vision_use_head=False)
    return text, vision, 16


def _gemma_3_4b():
    """google/gemma-3-4b-it's shapes (its config.json)."""
    text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                query_pre_attn_scalar=256, max_position_embeddings=131072, vocab_size=262208,
                sliding_window=1024, rms_norm_eps=1e-6,
                rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=1e4),
                                 "full_attention": dict(rope_type="linear", factor=8.0,
                                                        rope_theta=1e6)})
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False,
                  layer_norm_eps=1e-6)
    return text, vision, 256


def build_processor(tokenizer=None, image_size=32, image_seq_length=16):
    """A Gemma3Processor over the tiny tokenizer, resizing images to image_size px square."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor
    tokenizer = tokenizer or build_tokenizer()
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=CHAT_TEMPLATE, image_seq_length=image_seq_length)


def build_gemma3(size="tiny", seed=0, dtype=None, attn_implementation=None, device=None):
    """(model, processor): a Gemma3ForConditionalGeneration with random weights drawn from `seed`,
    in eval mode (bfloat16 by default for "gemma-3-4b", else float32), made directly on `device`
    (default: the CPU), and its Gemma3Processor, both made offline."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    tokenizer = build_tokenizer()
    text, vision, tokens = _tiny(len(tokenizer)) if size == "tiny" else _gemma_3_4b()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_index", "<image_soft_token>"), ("boi_token_index", "<start_of_image>"),
        ("eoi_token_index", "<end_of_image>")]}
    text.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)
    config = Gemma3Config(text_config=text,
                          vision_config=dict(vision, model_type="siglip_vision_model"),
                          mm_tokens_per_image=tokens, **ids)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if dtype is None:
        dtype = torch.float32 if size == "tiny" else torch.bfloat16
    model = make_model(Gemma3ForConditionalGeneration, config, seed, dtype, device, tokenizer)
    if size == "tiny":
        # Gemma 3 initialises its projector's weight to zeros: every image row would then be 0.
        with torch.no_grad():
            weight = model.model.multi_modal_projector.mm_input_projection_weight
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
    processor = build_processor(tokenizer, vision["image_size"], tokens)
    return model, processor


def save_gemma3(outdir, size="tiny", seed=0):
    """Build and save_pretrained the model and processor into `outdir`; returns outdir."""
    return save_pair(outdir, *build_gemma3(size, seed))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder to save the model and processor in")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    save_gemma3(args.outdir, args.size, args.seed)
    print(f"saved a {args.size} Gemma 3 model with random weights in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
