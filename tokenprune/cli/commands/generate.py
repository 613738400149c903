"""`tokenprune generate`: answer a prompt about images with a vision-language model whose
language model sees fewer image tokens. Its flags are declared here (the pruning ones:
flags.add_image_token_flags); tokenprune/cli/generate.py checks them before torch is imported,
then loads and runs the model. The families it runs are tokenprune.vlm.families.FAMILIES.
"""
from ...vlm.families import FAMILIES
from ..flags import add_device_flag, add_image_token_flags

FAMILY_NAMES = ", ".join(family.name for family in FAMILIES.values())

NAME = "generate"
HELP = (f"answer a prompt about images with a vision-language model ({FAMILY_NAMES}) that "
        "sees fewer image tokens")
DESCRIPTION = (f"Answer --prompt about each --image (one batch) with a vision-language model "
               f"({FAMILY_NAMES}) whose language model receives k_anchors + top_m image tokens "
               "per image, or with --ratio R ceil(R * n) of an image's n; prints each answer, "
               "the image tokens per image before and after, and the time to the first token. "
               "--compare runs the unpruned model too. Works offline on a saved folder.")


def add_arguments(parser):
    examples = ", ".join(family.example for family in FAMILIES.values())
    parser.add_argument("--model", required=True,
                        help=f"a model of a family above: a hub id (such as {examples}) or a "
                             "folder saved with save_pretrained (model and processor)")
    parser.add_argument("--image", action="append", required=True, metavar="FILE",
                        help="image file; repeat the flag for several (one batch, one answer "
                             "each)")
    parser.add_argument("--prompt", required=True,
                        help="the question, asked about every image; the processor's chat "
                             "template adds the image, unless the prompt holds the processor's "
                             "image token itself (<image> for LLaVA, <start_of_image> for "
                             "Gemma 3)")
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
