"""What `tokenprune visualize` draws from: the model, pruned, on its input (a shipped ViT on a
held-out canvas, or an OpenCLIP model on an image), and the patches its pruned blocks kept.
tokenprune/cli/visualize.py draws them."""
import functools
import os

import torch
from PIL import Image

from ..patch import UnsupportedModelError, pruned_blocks, replace_last_block
from ..reference import anchor_indices, head_mean_attention
from ..towers import find_tower
from .checks import check_device
from .common import CLIError, note
from .loading import loading_errors
from .model_checks import check_blocks, check_model, pretrained_hint
from .shipped_rules import DEMO_MODEL, SHIPPED_MODELS

RANDOM_WEIGHTS_SEED = 0  # an OpenCLIP model without --pretrained: the same weights every run


# ----- the model and its input --------------------------------------------------------------

def shipped_regime(args):
    """(regime, name in text) of the shipped ViT that runs: the one --model names, else the
    small one."""
    if args.model in SHIPPED_MODELS:
        return SHIPPED_MODELS[args.model], args.model
    return SHIPPED_MODELS[DEMO_MODEL], "shipped ViT"


def shipped_inputs(regime):
    """A regime's shipped ViT and its held-out canvas #DEMO_INDEX, as proxy.demo_inputs gives
    the small one's: (model, pixels (1, 3, H, W), preprocess, label, card)."""
    from ..proxy import DEMO_INDEX, demo_inputs, heldout_set, load_proxy_model, preprocess
    if regime == SHIPPED_MODELS[DEMO_MODEL]:
        return demo_inputs()
    model, card = load_proxy_model(regime)
    images, labels, _ = heldout_set(DEMO_INDEX + 1, card)
    normalize = preprocess()
    return (model, normalize(images[DEMO_INDEX:DEMO_INDEX + 1]), normalize,
            int(labels[DEMO_INDEX]), card)


def shipped_model_input(args, config):
    """A shipped ViT on a held-out canvas (the first-run demo's, or --model's).
    (model, pixels, preprocess, name, weights, source, {"label", "before"}), the model already
    pruned; "before" is its prediction unpruned (the model's output is the digit's logits)."""
    from ..proxy import DEMO_INDEX, describe
    device = check_device(args.device)
    regime, name = shipped_regime(args)
    note(f"loading {name if args.model else 'the shipped small ViT'} on {device}...")
    model, pixels, preprocess, label, card = shipped_inputs(regime)
    check_blocks(args, len(find_tower(model).blocks))  # also checked before loading
    print(f"model: {describe(card)}")
    with torch.no_grad():
        before = int(model(pixels).argmax(-1))
    try:
        replace_last_block(model, config=config)
    except ValueError as err:  # a value that only the built tower refuses
        raise CLIError(f"--{err}") from err
    return (model.to(device), pixels.to(device), preprocess, name, "trained",
            f"held-out canvas #{DEMO_INDEX} (a {label})", {"label": label, "before": before})


def clip_model_input(args, config, image_path):
    """An OpenCLIP model (random weights, seeded, unless --pretrained) on the image at
    `image_path` (--image or the sample picture). (model, pixels, preprocess, name, weights,
    source), the model already pruned."""
    try:
        image = Image.open(image_path).convert("RGB")
    except (OSError, ValueError) as err:
        raise CLIError(f"--image {image_path}: cannot read it as an image ({err})") from err
    device = check_device(args.device)

    import open_clip
    from open_clip.factory import parse_model_name
    check_model(args.model, args.pretrained, pruning_flag="")
    random_weights = not args.pretrained and parse_model_name(args.model)[0] is None
    if random_weights:
        note(f"note: no --pretrained given, so {args.model} has random weights (seeded: the same "
             "picture every run): it shows how the selection works, not what a trained CLIP "
             f"looks at. For trained weights add {pretrained_hint(args.model)}")
    note(f"loading {args.model} on {device}...")
    with loading_errors(args.model, args.pretrained, random_weights_noted=random_weights), \
            torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(
            args.model, pretrained=args.pretrained or None, cache_dir=args.model_cache_dir,
            device=device)
    model.eval()
    try:
        check_blocks(args, len(find_tower(model).blocks))  # a tower whose config gave no depth
        replace_last_block(model, config=config)
    except UnsupportedModelError as err:
        raise CLIError(f"--model {args.model}: {err}") from err
    except ValueError as err:  # a value that only the built tower refuses
        raise CLIError(f"--{err}") from err

    pixels = preprocess(image).unsqueeze(0).to(device)
    weights = ("random weights, seeded" if random_weights else
               os.path.basename(args.pretrained or "weights from the folder"))
    source = "the built-in sample image" if args.image is None else image_path
    return model, pixels, preprocess, args.model, weights, source


# ----- which patches each pruned block kept -------------------------------------------------

def anchors_of(block, args, kwargs):
    """The anchors (B, k) the pruned block chose when called with (args, kwargs): SPEC steps
    0-1, from the reference, on the block adapter's qkv. The block keeps only the union with
    the scored patches. Token indices (>= the block's prefix count)."""
    x, call = block.adapter.tokens(*args, **kwargs)
    qkv = block.adapter.qkv(x, call)
    P = head_mean_attention(qkv, block.adapter.num_heads, block.adapter.scale)
    k = min(block.stage_config.k_anchors, x.shape[1] - block.num_prefix)
    return anchor_indices(P, k, block.num_prefix, block.class_token)


@torch.no_grad()
def kept_tokens(model, pixels):
    """Run the pruned model on pixels (1, 3, H, W); (keep, anchors) of its (last) pruned block
    as 1-based patch numbers in raster order (token index - p + 1, p the prefix tokens:
    OpenCLIP's token indices). keep is every patch when the block had nothing to prune."""
    return stage_kept_tokens(model, pixels)[-1]


@torch.no_grad()
def stage_kept_tokens(model, pixels):
    """kept_tokens for every stage of the model's pruning, in order (one for a single cut):
    each (keep, anchors) in the original patch numbering, so a later stage's are among the
    patches the stage before kept. A stage that had nothing to prune keeps what reached it."""
    blocks = pruned_blocks(model)
    calls = [None] * len(blocks)

    def capture(stage, module, args, kwargs):
        calls[stage] = calls[stage] or (args, kwargs)

    handles = [block.register_forward_pre_hook(functools.partial(capture, stage),
                                               with_kwargs=True)
               for stage, block in enumerate(blocks)]
    try:
        getattr(model, "encode_image", model)(pixels)  # a CLIP model or a bare image tower
    finally:
        for handle in handles:
            handle.remove()
    stages, reached = [], None  # reached: the patches that reach the stage (None: all)
    for block, (args, kwargs) in zip(blocks, calls):
        # Only the score and mmr selections start from anchors (cls keeps the k + m top
        # patches alike, random draws them); a block with nothing to prune chose none.
        anchors = (anchors_of(block, args, kwargs)[0] if block.config.selection in
                   ("score", "mmr") and block.last_keep_idx is not None
                   else torch.zeros(0, dtype=torch.long))
        if reached is not None:  # the block's token p + i is the i-th patch that reached it
            anchors = reached[anchors.to(reached.device) - block.num_prefix]
        if block.last_keep_idx is not None:
            keep = block.last_keep_idx[0]
        elif reached is not None:
            keep = reached
        else:
            x, _ = block.adapter.tokens(*args, **kwargs)
            keep = torch.arange(block.num_prefix, x.shape[1], device=x.device)
        reached = keep
        shift = 1 - block.num_prefix
        stages.append(((keep + shift).cpu().tolist(), (anchors + shift).cpu().tolist()))
    return stages
