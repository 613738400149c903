"""`tokenprune generate`: answer a prompt about images with a vision-language model whose
language model sees fewer image tokens. Its flags are declared here (the pruning ones:
flags.add_image_token_flags); tokenprune/cli/generate.py checks them before torch is imported,
then loads and runs the model.
"""
from ..flags import add_device_flag, add_image_token_flags

NAME = "generate"
HELP = ("answer a prompt about images with a LLaVA-1.5 or Qwen2/2.5/3-VL model that sees fewer "
        "image tokens")
DESCRIPTION = ("Answer --prompt about each --image (one batch) with a LLaVA-1.5 or Qwen2/2.5/3-VL "
               "model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) whose language model receives k_anchors + "
               "top_m image tokens per image, or with --ratio R ceil(R * n) of an image's n; "
               "prints each answer, "
               "the image tokens per image before and after, and the time to the first token. "
               "--compare runs the unpruned model too. Works offline on a saved folder.")


def add_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="a LLaVA or Qwen-VL model: hub id (llava-hf/llava-1.5-7b-hf, "
                             "Qwen/Qwen2.5-VL-7B-Instruct) or a folder saved with "
                             "save_pretrained (model and processor)")
    parser.add_argument("--image", action="append", required=True, metavar="FILE",
                        help="image file; repeat the flag for several (one batch, one answer "
                             "each)")
    parser.add_argument("--prompt", required=True,
                        help="the question, asked about every image; the processor's chat "
                             "template adds the image, unless the prompt holds <image> itself")
    parser.add_argument("--compare", action="store_true",
                        help="also run the unpruned model on the same inputs, first")
    parser.add_argument("--max_new_tokens", type=int, default=32,
                        help="tokens to generate per answer (default %(default)s)")
    add_device_flag(parser)
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        default="auto", help="weights' dtype (default auto: float16 on CUDA, "
                                             "float32 on the CPU)")
    add_image_token_flags(parser)


def check(args, argv):
    from .. import generate  # no torch: bad values and missing files are said at once
    generate.check_generate_args(args)


def run(args, argv):
    from .. import generate
    generate.run_generate(args)
