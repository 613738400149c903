"""`tokenprune visualize`: draw an image with its anchor, kept and pruned patches. Its flags
are checked here, from the flags and the model's config, before anything heavy is imported;
tokenprune/cli/visualize.py draws (visualize_model.py loads and runs the model).
"""
import os

from ..checks import check_writable
from ..common import CLIError
from ..flags import PRUNING_DEFAULTS, add_device_flag, add_pruning_flags, prune_config
from ..model_checks import check_blocks, check_model, check_model_config, check_pretrained_files
from ..shipped_rules import DEMO_MODEL, SHIPPED_MODEL_PRUNING, SHIPPED_MODELS, use_shipped_model

NAME = "visualize"
HELP = "draw an image with its anchor, kept and pruned patches"
DESCRIPTION = ("Draw an image with the anchors and the kept patches marked and the pruned ones "
               "dimmed. With no arguments: a held-out canvas and the small ViT trained on "
               "scikit-learn's digits that ships with tokenprune, offline, pruned by the score, "
               "cls and mmr selections side by side. --model ViT-B-16 (no --pretrained): random "
               "weights, seeded, on the sample image. --schedule: one panel per stage.")


def add_arguments(parser):
    parser.add_argument("--image", default=None,
                        help="image file (default: the built-in sample picture)")
    parser.add_argument("--model", default=None,
                        help="OpenCLIP ViT architecture, or local-dir:/path, or a shipped ViT "
                             f"({' or '.join(SHIPPED_MODELS)}) (default: {DEMO_MODEL}, the "
                             "small ViT shipped with tokenprune; ViT-B-16 with --image or "
                             "--pretrained)")
    parser.add_argument("--pretrained", default=None,
                        help="pretrained tag (e.g. openai; downloads once) or local checkpoint "
                             "file (default: none, random weights, seeded)")
    parser.add_argument("--model_cache_dir", default=None,
                        help="where downloaded weights are cached")
    add_device_flag(parser)
    parser.add_argument("--out", default="kept.png", help="output PNG (default %(default)s)")
    # No --enable_pruning: it always prunes. k and m suit the patch count of the model that
    # runs, and the shipped model without --selection draws three selections: unset until
    # use_shipped_model knows which model runs.
    unset = {name: f"{shipped} for a shipped model, else {PRUNING_DEFAULTS[name]}"
             for name, shipped in SHIPPED_MODEL_PRUNING.items()}
    unset["selection"] = (f"{PRUNING_DEFAULTS['selection']}; without it, a shipped model's "
                          "picture shows score, cls and mmr side by side")
    add_pruning_flags(parser, enable_flag=False, unset=unset)  # --schedule: a panel per stage


def check(args, argv):
    use_shipped_model(args)  # fills in --model and the unset flags
    prune_config(args)
    check_image_output("--out", args.out)
    check_visualize_model(args)  # from the flags and the model's config: nothing loaded


def run(args, argv):
    from .. import visualize
    visualize.run_visualize(args)


def check_visualize_model(args):
    """visualize's --model, --pretrained, --layer and --schedule, from the flags and the model's
    config, before anything is imported (after use_shipped_model)."""
    if args.model is None or args.model in SHIPPED_MODELS:
        depth = check_model_config(args.model or DEMO_MODEL)
    else:
        check_pretrained_files([args.pretrained] if args.pretrained else [])
        depth = check_model_config(args.model, pruning_flag="")
        if args.pretrained and os.path.isdir(args.pretrained):  # a tag, or meant as a file?
            check_model(args.model, args.pretrained)
    check_blocks(args, depth)


def check_image_output(flag, path):
    """`tokenprune visualize --out`: a file name with an image extension that Pillow writes,
    not a folder, in a folder that exists or can be made and that can be written."""
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path}: a folder; give a file name, e.g. "
                       f"{flag} {os.path.join(path, 'kept.png')}")
    from PIL import Image
    Image.init()
    extension = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise CLIError(f"{flag} {path}: not an image file name Pillow can write (give one "
                       "ending in .png, e.g. kept.png)")
    check_writable(flag, path, os.path.dirname(path) or ".", create=True)
