"""LLaVA models with random weights and a processor made offline, for tests, benchmarks and CI.

    python tools/tiny_llava.py OUTDIR [--vision siglip] [--size tiny|cpu]

saves a LlavaForConditionalGeneration and its LlavaProcessor with save_pretrained, so that
`LlavaForConditionalGeneration.from_pretrained(OUTDIR)` and `AutoProcessor.from_pretrained(OUTDIR)`
load them back with no network. From Python (tests/ and bench/ put tools/ on sys.path):

    from tiny_llava import build_llava
    model, processor = build_llava("clip", "tiny")

Sizes:
- "tiny": a 32-px image in 8-px patches (16 patches), width 32, 2 vision and 2 text layers and a
  vocabulary of about 100 words: for tests.
- "cpu": LLaVA-1.5's shapes scaled down for CPU benchmarks: 336 px in 14-px patches (576 image
  tokens), selected at the second-to-last of 4 vision blocks of width 128, a Llama of 4 layers of
  width 256 (the language model twice as wide as the tower, as 4096 is to 1024 in LLaVA-1.5-7B).
- "llava-1.5-7b": the real LLaVA-1.5-7B configuration (CLIP ViT-L/14 at 336 px, feature layer -2,
  strategy "default"; Llama-2-7B), random weights in float16: about 14 GB, for GPU benchmarks only.

The tokenizer is a word-level vocabulary built here with the `tokenizers` library: <unk>, <s>,
</s>, <pad>, <image>, then lower-case words; anything else is <unk>. It adds <s> in front of every
text, as Llama's does. The chat template writes "USER: <image>\\n... ASSISTANT:" as LLaVA-1.5's.
"""
import argparse
import os
import sys

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = """
a an the this that these those is are was were be been it its of in on at to from with by for
and or not no yes what which who where when how why many much there here one two three four five
six seven eight nine ten image picture photo describe show shows see color colour red green blue
yellow black white gray orange purple pink brown left right top bottom middle center big small
large little dog cat bird car tree house person people man woman child sky sun water grass road
sign text number square circle line shape object animal
""".split()
PUNCTUATION = list(".,?!:;'\"()-")
ROLES = ["USER", "ASSISTANT", "SYSTEM"]

# Say what each image looks like and answer; an image entry in a message becomes one <image>
# (LlavaProcessor expands it to image_seq_length placeholders), followed by a new line.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }} {% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SIZES = ("tiny", "cpu", "llava-1.5-7b")
VISIONS = ("clip", "siglip")


def build_tokenizer(video=False):
    """A PreTrainedTokenizerFast over a word-level vocabulary, made without any download.
    video: also a <video> token, last in the vocabulary (the other ids do not change)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    videos = ["<video>"] if video else []
    vocab = {token: i for i, token in
             enumerate(SPECIAL_TOKENS + ROLES + WORDS + PUNCTUATION + videos)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", **({"video_token": "<video>"} if video
                                                           else {})},
        padding_side="left", model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"] + videos})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def word_level_tokenizer(vocabulary, special_tokens, chat_template, **options):
    """A PreTrainedTokenizerFast made offline over `vocabulary` (its tokens, with ids in that
    order; "<unk>" for anything else), that splits text at whitespace and punctuation, adds
    nothing in front of a text and joins words with spaces; `special_tokens` are added as special
    tokens (never split), `options` go to PreTrainedTokenizerFast (its named tokens, padding
    side, ...). For the Qwen-VL and Gemma 3 builders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **options)
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.chat_template = chat_template
    return tokenizer


def _vision_config(vision, size):
    from transformers import CLIPVisionConfig, SiglipVisionConfig
    shapes = {
        "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, image_size=32, patch_size=8),
        "cpu": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, image_size=336, patch_size=14),
        "llava-1.5-7b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, image_size=336, patch_size=14),
    }[size]
    if vision == "clip":
        return CLIPVisionConfig(**shapes, projection_dim=shapes["hidden_size"],
                                hidden_act="quick_gelu")
    return SiglipVisionConfig(**shapes)


def _text_config(size, vocab_size, pad_token_id):
    from transformers import LlamaConfig
    shapes = {
        "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=512),
        "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=8,
                    max_position_embeddings=2048),
        # Llama-2-7B; its vocabulary of 32000 plus LLaVA's <image> and <pad>, padded to 32064.
        "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-5),
    }[size]
    vocab = 32064 if size == "llava-1.5-7b" else vocab_size
    return LlamaConfig(**shapes, vocab_size=vocab, pad_token_id=pad_token_id, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False)


def _image_processor(vision, image_size):
    from transformers import CLIPImageProcessor, SiglipImageProcessor
    if vision == "clip":
        return CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})
    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


def make_model(model_class, config, seed, dtype, device, tokenizer):
    """model_class(config) with weights drawn from `seed`, made in `dtype` on `device` directly
    (a 7B model is not made in float32 first), in eval mode, generating with the tokenizer's
    pad, bos and eos ids."""
    import torch
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device or "cpu"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_llava(vision="clip", size="tiny", seed=0, dtype=None, vision_feature_layer=-2,
                vision_feature_select_strategy="default", attn_implementation=None, device=None):
    """(model, processor): a LlavaForConditionalGeneration with random weights drawn from `seed`,
    in eval mode (in `dtype`, float16 by default for "llava-1.5-7b", else float32), made
    directly on `device` (default: the CPU), and its LlavaProcessor, both made offline."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if vision not in VISIONS:
        raise ValueError(f"vision must be one of {', '.join(VISIONS)}, got {vision!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    tokenizer = build_tokenizer()
    vision_config = _vision_config(vision, size)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    # CLIP's tower has a class token in front of its patches, SigLIP's has none; "default" drops
    # row 0 either way (transformers' own rule: for SigLIP that row is a patch).
    rows = patches + (1 if vision == "clip" else 0)
    image_seq_length = rows - 1 if vision_feature_select_strategy == "default" else rows
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_text_config(size, len(tokenizer), tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=image_seq_length, projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy)
    config.pad_token_id = tokenizer.pad_token_id
    if dtype is None:
        dtype = torch.float16 if size == "llava-1.5-7b" else torch.float32
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = make_model(LlavaForConditionalGeneration, config, seed, dtype, device, tokenizer)

    processor = LlavaProcessor(
        image_processor=_image_processor(vision, vision_config.image_size), tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1 if vision == "clip" else 0)
    return model, processor


def save_pair(outdir, model, processor):
    """save_pretrained the model and its processor into `outdir` (made if missing); outdir."""
    os.makedirs(outdir, exist_ok=True)
    model.save_pretrained(outdir)
    processor.save_pretrained(outdir)
    return outdir


def save_llava(outdir, vision="clip", size="tiny", seed=0, **options):
    """Build and save_pretrained the model and processor into `outdir`; returns outdir."""
    return save_pair(outdir, *build_llava(vision, size, seed, **options))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder to save the model and processor in")
    parser.add_argument("--vision", choices=VISIONS, default="clip",
                        help="vision tower family (default %(default)s)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    parser.add_argument("--vision_feature_layer", type=int, nargs="+", default=[-2],
                        help="one index into the tower's hidden states, or several (default -2)")
    parser.add_argument("--vision_feature_select_strategy", choices=("default", "full"),
                        default="default")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    layer = args.vision_feature_layer
    save_llava(args.outdir, args.vision, args.size, args.seed,
               vision_feature_layer=layer[0] if len(layer) == 1 else layer,
               vision_feature_select_strategy=args.vision_feature_select_strategy)
    print(f"saved a {args.size} {args.vision} LLaVA with random weights in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
