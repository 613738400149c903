"""`tokenprune visualize`: draw an image with its anchor, kept and pruned patches.

Two panels: the model's input (after OpenCLIP's resize and crop) and the same picture with the
pruned patches dimmed, the anchors outlined in orange and the other kept patches in cyan.
With no arguments it draws a held-out canvas with the small ViT trained on scikit-learn's digits
that ships with the package (tokenprune/proxy.py), offline. `--model ViT-B-16` (no --pretrained)
draws the built-in sample picture with random weights, drawn from a fixed seed, so the same
command draws the same picture.
"""
import os
import warnings
from importlib import resources

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..patch import UnsupportedModelError, pruned_block, replace_last_block
from ..reference import anchor_indices, head_mean_attention
from ..towers import find_tower
from .common import (CLIError, check_device, check_model, loading_errors, note, pretrained_hint,
                     prune_config, use_shipped_model)

RANDOM_WEIGHTS_SEED = 0
PANEL = 448        # the panels are scaled up by an integer factor to about this size
MARGIN = 16
HEADER = 92
FOOTER = 30
DIM = 0.28         # pruned patches keep this fraction of their brightness...
DESATURATE = 0.5   # ...after this much of their colour is taken out
ANCHOR_RGB = (255, 136, 0)
KEPT_RGB = (0, 200, 255)
PRUNED_RGB = (40, 40, 46)
TEXT_RGB = (34, 34, 40)
MUTED_RGB = (96, 96, 104)


def sample_image_path():
    return str(resources.files("tokenprune").joinpath("assets", "sample.png"))


# ----- which tokens are kept ---------------------------------------------------------------

def anchors_of(block, args, kwargs):
    """The anchors (B, k) the pruned block chose when called with (args, kwargs): SPEC steps
    0-1, from the reference, on the block adapter's qkv. The block keeps only the union with
    the scored patches. Token indices (>= the block's prefix count)."""
    x, call = block.adapter.tokens(*args, **kwargs)
    qkv = block.adapter.qkv(x, call)
    P = head_mean_attention(qkv, block.adapter.num_heads, block.adapter.scale)
    k = min(block.config.k_anchors, x.shape[1] - block.num_prefix)
    return anchor_indices(P, k, block.num_prefix, block.class_token)


@torch.no_grad()
def kept_tokens(model, pixels):
    """Run the pruned model on pixels (1, 3, H, W); (keep, anchors) as 1-based patch numbers in
    raster order (token index - p + 1, p the prefix tokens: OpenCLIP's token indices).

    keep is every patch when the block had nothing to prune."""
    block = pruned_block(model)
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        getattr(model, "encode_image", model)(pixels)  # a CLIP model or a bare image tower
    finally:
        handle.remove()
    # Only the score and mmr selections start from anchors (cls keeps the k + m top patches
    # alike, random draws them).
    anchors = (anchors_of(block, *captured["call"])[0]
               if block.config.selection in ("score", "mmr") else torch.zeros(0, dtype=torch.long))
    if block.last_keep_idx is None:
        x, _ = block.adapter.tokens(*captured["call"][0], **captured["call"][1])
        keep = torch.arange(block.num_prefix, x.shape[1], device=x.device)
    else:
        keep = block.last_keep_idx[0]
    shift = 1 - block.num_prefix
    return (keep + shift).cpu().tolist(), (anchors + shift).cpu().tolist()


def display_image(preprocess, pixels):
    """The model's input as an RGB uint8 array: the preprocessing's Normalize undone."""
    image = pixels[0].float().cpu()
    for step in getattr(preprocess, "transforms", []):
        if type(step).__name__ == "Normalize":
            mean = torch.as_tensor(step.mean, dtype=torch.float32)[:, None, None]
            std = torch.as_tensor(step.std, dtype=torch.float32)[:, None, None]
            image = image * std + mean
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


# ----- drawing -----------------------------------------------------------------------------

def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def layout(height, width):
    """Where render() puts things: scale, the two panel boxes (x0, y0, x1, y1), image size."""
    scale = max(1, PANEL // max(height, width))
    pw, ph = width * scale, height * scale
    original = (MARGIN, HEADER, MARGIN + pw, HEADER + ph)
    kept = (2 * MARGIN + pw, HEADER, 2 * MARGIN + 2 * pw, HEADER + ph)
    size = (3 * MARGIN + 2 * pw, HEADER + ph + FOOTER)
    return {"scale": scale, "original": original, "kept": kept, "size": size}


def patch_box(token, grid, patch, scale, origin):
    """Pixel box (x0, y0, x1, y1) of token index `token` (>= 1, raster order) in a panel."""
    row, col = divmod(token - 1, grid[1])
    x0 = origin[0] + col * patch[1] * scale
    y0 = origin[1] + row * patch[0] * scale
    return (x0, y0, x0 + patch[1] * scale - 1, y0 + patch[0] * scale - 1)


def render(image, grid, keep_idx, anchors, title, subtitle, kept_by="score"):
    """The figure: `image` (H, W, 3) uint8, the patch grid (rows, cols), kept and anchor token
    indices (>= 1); `kept_by` names what kept the patches that are not anchors (the legend).
    Returns (PIL image, layout(H, W))."""
    height, width = image.shape[:2]
    patch = (height // grid[0], width // grid[1])
    geo = layout(height, width)
    scale = geo["scale"]
    canvas = Image.new("RGB", geo["size"], (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    big = Image.fromarray(image).resize((width * scale, height * scale), Image.NEAREST)
    canvas.paste(big, geo["original"][:2])

    kept = set(keep_idx)
    anchors = [a for a in anchors if a in kept]
    pixels = np.asarray(big).astype(np.float32)
    gray = pixels.mean(axis=2, keepdims=True)
    dimmed = ((1 - DESATURATE) * pixels + DESATURATE * gray) * DIM
    mask = np.zeros(pixels.shape[:2], dtype=bool)  # True where the patch is pruned
    for token in range(1, grid[0] * grid[1] + 1):
        if token not in kept:
            x0, y0, x1, y1 = patch_box(token, grid, patch, scale, (0, 0))
            mask[y0:y1 + 1, x0:x1 + 1] = True
    pruned_view = np.where(mask[..., None], dimmed, pixels).round().astype(np.uint8)
    canvas.paste(Image.fromarray(pruned_view), geo["kept"][:2])

    line = max(1, scale * min(patch) // 16)
    origin = geo["kept"][:2]
    for token in sorted(kept - set(anchors)):
        draw.rectangle(patch_box(token, grid, patch, scale, origin), outline=KEPT_RGB, width=line)
    for token in anchors:  # drawn last, on top of their kept neighbours
        draw.rectangle(patch_box(token, grid, patch, scale, origin), outline=ANCHOR_RGB,
                       width=line + 1)

    # Header: title, subtitle, legend. Footer: what each panel is.
    draw.text((MARGIN, 10), title, fill=TEXT_RGB, font=_font(18))
    draw.text((MARGIN, 36), subtitle, fill=MUTED_RGB, font=_font(14))
    x, y, font = MARGIN, 64, _font(14)
    n_patches = grid[0] * grid[1]
    for colour, fill, label in ((ANCHOR_RGB, None, f"anchor ({len(anchors)})"),
                                (KEPT_RGB, None, f"kept by {kept_by} ({len(kept) - len(anchors)})"),
                                (PRUNED_RGB, PRUNED_RGB, f"pruned ({n_patches - len(kept)})")):
        draw.rectangle((x, y, x + 14, y + 14), outline=colour, fill=fill, width=3)
        draw.text((x + 20, y), label, fill=TEXT_RGB, font=font)
        x += 28 + int(draw.textlength(label, font=font)) + 12
    foot_y = geo["original"][3] + 8
    draw.text((geo["original"][0], foot_y),
              f"input: {width}x{height} px, {grid[0]}x{grid[1]} patches of {patch[0]} px",
              fill=MUTED_RGB, font=font)
    draw.text((geo["kept"][0], foot_y),
              f"after pruning: {len(kept)} of {n_patches} patches kept",
              fill=MUTED_RGB, font=font)
    return canvas, geo


# ----- the command ------------------------------------------------------------------------

# What keeps the patches that are not anchors, per selection (the legend and the summary line).
KEPT_BY = {"score": "score", "mmr": "MMR", "cls": "CLS attention", "random": "chance"}


def selection_settings(config):
    """The settings that the configuration's selection uses, for the subtitle."""
    kept = f"k_anchors={config.k_anchors}, top_m={config.top_m}"
    if config.selection == "score":
        return f"{kept}, alpha={config.alpha:g}, score_norm={config.score_norm}"
    if config.selection == "mmr":
        return f"selection=mmr, {kept}, mmr_lambda={config.mmr_lambda:g}"
    seed = f", seed={config.seed}" if config.selection == "random" else ""
    return f"selection={config.selection}, {config.kept_patches} patches{seed}"

def run_visualize(args):
    shipped = use_shipped_model(args)
    config = prune_config(args)
    demo = None  # the shipped model's label and unpruned prediction
    if shipped:
        model, pixels, preprocess, name, weights, source, demo = shipped_model_input(args, config)
    else:
        model, pixels, preprocess, name, weights, source = clip_model_input(args, config)
    tower = find_tower(model)
    grid = tuple(tower.grid_size)
    n_patches = grid[0] * grid[1]
    blocks = len(tower.blocks)
    index = config.layer % blocks
    # 1-based in prose, like "block 12 of 12"; `index` is the 0-based index into resblocks.
    where = f"block {index + 1} of {blocks} (index {index})"
    pruned = config.kept_patches < n_patches
    if not pruned:
        note(f"warning: k_anchors + top_m = {config.kept_patches} >= {n_patches} patches: "
             "nothing to prune, every patch is kept")
    note(f"running the model{f' with pruning at {where}' if pruned else ''}...")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"k_anchors \+ top_m = \d+ >= \d+ patch")
        try:
            keep_idx, anchors = kept_tokens(model, pixels)
        except RuntimeError as err:  # e.g. --backend triton on a machine without it
            raise CLIError(f"--backend {config.backend}: {err}") from err

    prefix = tower.num_prefix
    lead = "CLS" if prefix == 1 and tower.class_token else f"{prefix} prefix tokens"
    tokens_before, tokens_after = n_patches + prefix, len(keep_idx) + prefix
    title = (f"tokenprune  |  {name} ({weights})  |  " +
             (f"pruned at {where}" if pruned else
              f"nothing pruned: k_anchors + top_m >= {n_patches} patches"))
    subtitle = (f"{selection_settings(config)}  |  tokens {tokens_before} -> {tokens_after}")
    note(f"drawing {args.out}...")
    kept_by = KEPT_BY[config.selection]
    figure, geo = render(display_image(preprocess, pixels), grid, keep_idx, anchors, title,
                         subtitle, kept_by)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
        figure.save(args.out)
    except (OSError, ValueError) as err:
        raise CLIError(f"--out {args.out}: cannot write the PNG ({err})") from err
    if pruned:
        anchor_part = f"{len(anchors)} anchors + " if anchors else ""
        print(f"{name}: {tokens_before} -> {tokens_after} tokens at {where}: {lead} + "
              f"{anchor_part}{tokens_after - prefix - len(anchors)} kept by {kept_by}; "
              f"{tokens_before - tokens_after} pruned; on {source}")
    else:
        print(f"{name}: nothing pruned, all {tokens_before} tokens kept (k_anchors + top_m "
              f"= {config.kept_patches} >= {n_patches} patches); on {source}")
    if demo is not None:  # the claim of the picture: the model still reads the digit
        with torch.no_grad():
            after = int(model(pixels).argmax(-1))
        print(f"prediction: {demo['before']} before pruning, {after} after pruning (true label "
              f"{demo['label']})")
    print(f"wrote {args.out} ({geo['size'][0]}x{geo['size'][1]})")
    return {"out": args.out, "keep_idx": keep_idx, "anchors": anchors, "grid": grid,
            "layout": geo, "tokens_before": tokens_before, "tokens_after": tokens_after,
            "title": title}


def shipped_model_input(args, config):
    """The first-run demo: the small ViT shipped with the package on a held-out canvas.
    (model, pixels, preprocess, name, weights, source, {"label", "before"}), the model already
    pruned; "before" is its prediction unpruned (the model's output is the digit's logits)."""
    from ..proxy import DEMO_INDEX, demo_inputs, describe
    device = check_device(args.device)
    note(f"loading the shipped small ViT on {device}...")
    model, pixels, preprocess, label, card = demo_inputs()
    print(f"model: {describe(card)}")
    with torch.no_grad():
        before = int(model(pixels).argmax(-1))
    try:
        replace_last_block(model, config=config)
    except ValueError as err:  # --layer out of range for this model
        raise CLIError(f"--{err}") from err
    return (model.to(device), pixels.to(device), preprocess, "shipped ViT", "trained",
            f"held-out canvas #{DEMO_INDEX} (a {label})", {"label": label, "before": before})


def clip_model_input(args, config):
    """An OpenCLIP model (random weights, seeded, unless --pretrained) on --image or the sample
    picture. (model, pixels, preprocess, name, weights, source), the model already pruned."""
    image_path = args.image or sample_image_path()
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
        replace_last_block(model, config=config)
    except UnsupportedModelError as err:
        raise CLIError(f"--model {args.model}: {err}") from err
    except ValueError as err:  # --layer out of range for this model
        raise CLIError(f"--{err}") from err

    pixels = preprocess(image).unsqueeze(0).to(device)
    weights = ("random weights, seeded" if random_weights else
               os.path.basename(args.pretrained or "weights from the folder"))
    source = "the built-in sample image" if args.image is None else image_path
    return model, pixels, preprocess, args.model, weights, source
