"""`tokenprune visualize`: draw an image with its anchor, kept and pruned patches.

Two panels: the model's input (after OpenCLIP's resize and crop) and the same picture with the
pruned patches dimmed, the anchors outlined in orange and the other kept patches in cyan.
With no arguments it draws a held-out canvas with the small ViT trained on scikit-learn's digits
that ships with the package (tokenprune/proxy.py), offline, pruned by the seed's default
selection, `cls` and `mmr` side by side (one panel each, with its prediction) and a caption on
why the default keeps background; `--selection` draws one. `--model ViT-B-16` (no --pretrained)
draws the built-in sample picture with random weights, drawn from a fixed seed, so the same
command draws the same picture. With `--schedule`, one panel per stage, each with the patches
kept after that stage (among those the stage before kept) and its anchors.
"""
import dataclasses
import os
import warnings
from importlib import resources
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..patch import remove_pruning, replace_last_block
from ..towers import find_tower
from .checks import check_device
from .common import CLIError, note
from .flags import prune_config, schedule_text
from .model_checks import check_blocks
from .shipped_rules import use_shipped_model
from .visualize_model import (clip_model_input, kept_tokens, shipped_inputs, shipped_model_input,
                              shipped_regime, stage_kept_tokens)

PANEL = 448        # the panels are scaled up by an integer factor to about this size
MARGIN = 16
HEADER = 92
FOOTER = 30
HEADING = 46       # the two lines above each panel of a comparison
CAPTION_LINE = 20  # each line of its caption
COMPARE_PANEL = 300  # a comparison's panels are smaller: four side by side
DIM = 0.28         # pruned patches keep this fraction of their brightness...
DESATURATE = 0.5   # ...after this much of their colour is taken out
ANCHOR_RGB = (255, 136, 0)
KEPT_RGB = (0, 200, 255)
PRUNED_RGB = (40, 40, 46)
TEXT_RGB = (34, 34, 40)
MUTED_RGB = (96, 96, 104)


def sample_image_path():
    return str(resources.files("tokenprune").joinpath("assets", "sample.png"))


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


def layout(height, width, selections=1, panel=PANEL, headings=False, caption_lines=0):
    """Where the figure puts things: scale, the input panel's box (x0, y0, x1, y1), the first
    selection panel's ("kept") and every selection panel's ("panels"), the image size.
    `headings`: a line above each panel; `caption_lines`: lines of text below the footers."""
    scale = max(1, panel // max(height, width))
    pw, ph = width * scale, height * scale
    top = HEADER + (HEADING if headings else 0)
    boxes = [(MARGIN + i * (MARGIN + pw), top, MARGIN + i * (MARGIN + pw) + pw, top + ph)
             for i in range(1 + selections)]
    size = ((2 + selections) * MARGIN + (1 + selections) * pw,
            top + ph + FOOTER + caption_lines * CAPTION_LINE + (MARGIN if caption_lines else 0))
    return {"scale": scale, "original": boxes[0], "kept": boxes[1], "panels": boxes[1:],
            "size": size}


def patch_box(token, grid, patch, scale, origin):
    """Pixel box (x0, y0, x1, y1) of token index `token` (>= 1, raster order) in a panel."""
    row, col = divmod(token - 1, grid[1])
    x0 = origin[0] + col * patch[1] * scale
    y0 = origin[1] + row * patch[0] * scale
    return (x0, y0, x0 + patch[1] * scale - 1, y0 + patch[0] * scale - 1)


class Panel(NamedTuple):
    """One selection's panel: the kept and anchor token indices (>= 1), the two lines above
    it (None: none) and the line below it."""
    keep: list
    anchors: list
    heading: Optional[str]
    footer: str


def render(image, grid, keep_idx, anchors, title, subtitle, kept_by="score"):
    """The figure of one selection: `image` (H, W, 3) uint8, the patch grid (rows, cols), kept
    and anchor token indices (>= 1); `kept_by` names what kept the patches that are not anchors
    (the legend). Returns (PIL image, layout(H, W))."""
    kept = set(keep_idx)
    anchors = [a for a in anchors if a in kept]
    n_patches = grid[0] * grid[1]
    legend = [f"anchor ({len(anchors)})", f"kept by {kept_by} ({len(kept) - len(anchors)})",
              f"pruned ({n_patches - len(kept)})"]
    footer = f"after pruning: {len(kept)} of {n_patches} patches kept"
    return render_panels(image, grid, [Panel(keep_idx, anchors, None, footer)], title,
                         subtitle, legend)


def render_panels(image, grid, panels, title, subtitle, legend, caption=(), panel=PANEL):
    """The figure: the input, then one panel per selection (Panel) with the pruned patches
    dimmed and the anchors and other kept patches outlined; a header (title, subtitle, the
    three `legend` labels: anchor, kept, pruned) and the `caption` lines at the bottom.
    Returns (PIL image, layout)."""
    height, width = image.shape[:2]
    patch = (height // grid[0], width // grid[1])
    headings = any(p.heading is not None for p in panels)
    geo = layout(height, width, len(panels), panel, headings, len(caption))
    scale = geo["scale"]
    canvas = Image.new("RGB", geo["size"], (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)

    big = Image.fromarray(image).resize((width * scale, height * scale), Image.NEAREST)
    canvas.paste(big, geo["original"][:2])
    pixels = np.asarray(big).astype(np.float32)
    gray = pixels.mean(axis=2, keepdims=True)
    dimmed = ((1 - DESATURATE) * pixels + DESATURATE * gray) * DIM
    line = max(1, scale * min(patch) // 16)
    foot_y = geo["original"][3] + 8
    for box, chosen in zip(geo["panels"], panels):
        kept = set(chosen.keep)
        anchors = [a for a in chosen.anchors if a in kept]
        mask = np.zeros(pixels.shape[:2], dtype=bool)  # True where the patch is pruned
        for token in range(1, grid[0] * grid[1] + 1):
            if token not in kept:
                x0, y0, x1, y1 = patch_box(token, grid, patch, scale, (0, 0))
                mask[y0:y1 + 1, x0:x1 + 1] = True
        pruned_view = np.where(mask[..., None], dimmed, pixels).round().astype(np.uint8)
        canvas.paste(Image.fromarray(pruned_view), box[:2])
        for token in sorted(kept - set(anchors)):
            draw.rectangle(patch_box(token, grid, patch, scale, box[:2]), outline=KEPT_RGB,
                           width=line)
        for token in anchors:  # drawn last, on top of their kept neighbours
            draw.rectangle(patch_box(token, grid, patch, scale, box[:2]), outline=ANCHOR_RGB,
                           width=line + 1)
        if chosen.heading is not None:
            draw.multiline_text((box[0], box[1] - HEADING + 2), chosen.heading,
                                fill=TEXT_RGB, font=_font(16), spacing=4)
        draw.text((box[0], foot_y), chosen.footer, fill=MUTED_RGB, font=font)

    # Header: title, subtitle, legend. Footer: what each panel is; then the caption.
    draw.text((MARGIN, 10), title, fill=TEXT_RGB, font=_font(18))
    draw.text((MARGIN, 36), subtitle, fill=MUTED_RGB, font=font)
    x, y = MARGIN, 64
    for (colour, fill), label in zip(((ANCHOR_RGB, None), (KEPT_RGB, None),
                                      (PRUNED_RGB, PRUNED_RGB)), legend):
        draw.rectangle((x, y, x + 14, y + 14), outline=colour, fill=fill, width=3)
        draw.text((x + 20, y), label, fill=TEXT_RGB, font=font)
        x += 28 + int(draw.textlength(label, font=font)) + 12
    draw.text((geo["original"][0], foot_y),
              f"input: {width}x{height} px, {grid[0]}x{grid[1]} patches of {patch[0]} px",
              fill=MUTED_RGB, font=font)
    for i, text in enumerate(caption):
        draw.text((MARGIN, foot_y + FOOTER - 4 + i * CAPTION_LINE), text, fill=TEXT_RGB,
                  font=font)
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
    if args.compare_selections:
        return compare_selections(args, config)
    demo = None  # the shipped model's label and unpruned prediction
    if shipped:
        model, pixels, preprocess, name, weights, source, demo = shipped_model_input(args, config)
    else:
        model, pixels, preprocess, name, weights, source = clip_model_input(
            args, config, args.image or sample_image_path())
    if config.schedule:
        return draw_stages(args, config, model, pixels, preprocess, name, weights, source, demo)
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
    save_figure(figure, args.out)
    if pruned:
        anchor_part = f"{len(anchors)} anchors + " if anchors else ""
        print(f"{name}: {tokens_before} -> {tokens_after} tokens at {where}: {lead} + "
              f"{anchor_part}{tokens_after - prefix - len(anchors)} kept by {kept_by}; "
              f"{tokens_before - tokens_after} pruned; on {source}")
    else:
        print(f"{name}: nothing pruned, all {tokens_before} tokens kept (k_anchors + top_m "
              f"= {config.kept_patches} >= {n_patches} patches); on {source}")
    print_ending(model, pixels, demo, args.out, geo)
    return {"out": args.out, "keep_idx": keep_idx, "anchors": anchors, "grid": grid,
            "layout": geo, "tokens_before": tokens_before, "tokens_after": tokens_after,
            "title": title}


def print_ending(model, pixels, demo, out, geo):
    """The last lines: the shipped model's prediction after pruning (the claim of the picture:
    the model still reads the digit), then the file written."""
    if demo is not None:
        with torch.no_grad():
            after = int(model(pixels).argmax(-1))
        print(f"prediction: {demo['before']} before pruning, {after} after pruning (true label "
              f"{demo['label']})")
    print(f"wrote {out} ({geo['size'][0]}x{geo['size'][1]})")


def draw_stages(args, config, model, pixels, preprocess, name, weights, source, demo):
    """A schedule's figure: the input, then one panel per stage with the patches kept after
    that stage and its anchors (stage_kept_tokens). Returns what run_visualize returns, with
    "stages": [{"block", "keep", "anchors"}] per stage."""
    tower = find_tower(model)
    grid, blocks, prefix = tuple(tower.grid_size), len(tower.blocks), tower.num_prefix
    n_patches = grid[0] * grid[1]
    indices = config.block_indices(blocks)
    where = f"blocks {', '.join(str(i + 1) for i in indices)} of {blocks} (a schedule)"
    note(f"running the model with pruning at {where}...")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"k_anchors \+ top_m = \d+ >= \d+ patch")
        try:
            stages = stage_kept_tokens(model, pixels)
        except RuntimeError as err:  # e.g. --backend triton on a machine without it
            raise CLIError(f"--backend {config.backend}: {err}") from err
    kept_by = KEPT_BY[config.selection]
    lead = "CLS" if prefix == 1 and tower.class_token else f"{prefix} prefix tokens"
    reaching = [n_patches] + [len(keep) for keep, _ in stages[:-1]]
    panels, lines = [], []
    for number, (index, before, (keep, anchors)) in enumerate(zip(indices, reaching, stages), 1):
        at = f"block {index + 1} of {blocks} (index {index})"
        anchor_part = f"{len(anchors)} anchors + " if anchors else ""
        kept = f"{anchor_part}{len(keep) - len(anchors)} kept by {kept_by}"
        panels.append(Panel(keep, anchors, f"stage {number}: {at}\nkeeps {len(keep)} of "
                                           f"{before} patches", kept))
        lines.append(f"  stage {number} at {at}: {lead} + {kept}, of the {before} patches that "
                     f"reach it")
    tokens = " -> ".join(str(count + prefix) for count in [n_patches] + [len(k) for k, _ in stages])
    schedule = schedule_text(config.stages)
    title = f"tokenprune  |  {name} ({weights})  |  pruned at {where}"
    subtitle = f"schedule {schedule}, selection={config.selection}  |  tokens {tokens}"
    note(f"drawing {args.out}...")
    figure, geo = render_panels(display_image(preprocess, pixels), grid, panels, title, subtitle,
                                ["anchor", f"kept by {kept_by}", "pruned"], (), COMPARE_PANEL)
    save_figure(figure, args.out)
    print(f"{name}: {tokens} tokens at {where}, on {source}:")
    print("\n".join(lines))
    print_ending(model, pixels, demo, args.out, geo)
    return {"out": args.out, "panels": panels, "layout": geo, "title": title,
            "stages": [{"block": index, "keep": keep, "anchors": anchors}
                       for index, (keep, anchors) in zip(indices, stages)]}


# The first-run demo's selections, side by side: the seed's default and the two that keep the
# digit (docs/choosing-settings.md).
COMPARED = ("score", "cls", "mmr")


def why_background(digit_patches, n_patches, kept, regime="small"):
    """The demo's caption: why the seed's default keeps background (docs/commands.md), where
    that is what the picture shows: the small digit, with most kept patches background. Else
    what the picture shows instead: nothing pruned, or a digit too large for that story."""
    if kept >= n_patches:
        return (f"Nothing is pruned: k_anchors + top_m = {kept} >= the {n_patches} patches, so "
                f"every selection keeps all {n_patches}, the digit's {digit_patches} among them.",)
    if regime != "small" or 2 * digit_patches >= kept:
        return (f"The digit lies in {digit_patches} of the {n_patches} patches, and each "
                f"selection keeps {kept}: the line under each panel says how many of the "
                "digit's patches it kept (docs/selections.md).",)
    return (f"The digit lies in {digit_patches} of the {n_patches} patches, so most of any "
            f"{kept} kept patches are background. score, the seed's default, adds diversity",
            "(unlike the anchors) to importance (attention to the anchors); with score_norm "
            "none, diversity varies far more, so it keeps the patches",
            "least like the anchors: blank ones, spread out. cls keeps the patches the class "
            "token attends to most; mmr the anchors, then attended",
            "patches unlike those kept so far (docs/selections.md).")


def _selection_name(config):
    if config.selection == "score":
        return f"score (default, alpha {config.alpha:g})"
    if config.selection == "mmr":
        return f"mmr (lambda {config.mmr_lambda:g})"
    return config.selection


def compare_selections(args, config):
    """The first-run demo: the shipped ViT on a held-out canvas, pruned by each selection of
    COMPARED in turn (with the flags' k, m, layer, alpha and mmr_lambda), one panel each with
    its prediction and how many of the digit's patches it kept."""
    from ..proxy import DEMO_INDEX, describe, heldout_set, object_patches
    device = check_device(args.device)
    regime, name = shipped_regime(args)
    note(f"loading {name if args.model else 'the shipped small ViT'} on {device}...")
    model, pixels, preprocess, label, card = shipped_inputs(regime)
    model, pixels = model.to(device), pixels.to(device)
    tower = find_tower(model)
    grid, blocks = tuple(tower.grid_size), len(tower.blocks)
    check_blocks(args, blocks)  # checked before loading too: a shipped tower's depth is known
    _, _, boxes = heldout_set(DEMO_INDEX + 1, card)
    digit = set((object_patches(boxes[DEMO_INDEX:DEMO_INDEX + 1])[0].nonzero()[:, 0] + 1).tolist())
    print(f"model: {describe(card)}")
    with torch.no_grad():
        before = int(model(pixels).argmax(-1))
    n_patches = grid[0] * grid[1]
    index = config.layer % blocks
    where = f"block {index + 1} of {blocks} (index {index})"
    pruned = config.kept_patches < n_patches
    if pruned:
        note(f"running the model with {', '.join(COMPARED)} at {where}...")
    else:
        note(f"warning: k_anchors + top_m = {config.kept_patches} >= {n_patches} patches: "
             "nothing to prune, every patch is kept")
        note("running the model...")
    panels, lines = [], []
    for selection in COMPARED:
        chosen = dataclasses.replace(config, selection=selection)
        try:
            replace_last_block(model, config=chosen)
        except ValueError as err:  # a value that only the built tower refuses
            raise CLIError(f"--{err}") from err
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=r"k_anchors \+ top_m = \d+ >= \d+ patch")
            try:
                keep, anchors = kept_tokens(model, pixels)
            except RuntimeError as err:  # e.g. --backend triton on a machine without it
                raise CLIError(f"--backend {config.backend}: {err}") from err
            after = int(model(pixels).argmax(-1))
        remove_pruning(model)
        on_digit = len(digit & set(keep))
        verdict = "right" if after == label else "wrong"
        selection_name = _selection_name(chosen)
        panels.append(Panel(keep, anchors, f"{selection_name}\npredicts {after} ({verdict})",
                            f"{on_digit} of the digit's {len(digit)} patches kept"))
        if pruned:
            anchor_part = f"{len(anchors)} anchors + " if anchors else ""
            kept = (f"CLS + {anchor_part}{len(keep) - len(anchors)} kept by "
                    f"{KEPT_BY[selection]}, {on_digit} of the digit's {len(digit)} patches "
                    "among them")
        else:
            kept = f"all {len(keep)} patches kept, the digit's {on_digit} among them"
        lines.append(f"  {selection_name}: {kept}; prediction {after}")
    tokens_before, tokens_after = n_patches + 1, len(panels[0].keep) + 1
    source = f"held-out canvas #{DEMO_INDEX} (a {label})"
    nothing = (f"nothing pruned: k_anchors + top_m = {config.kept_patches} >= {n_patches} "
               f"patches, all {n_patches} kept")
    title = (f"tokenprune  |  {name} (trained)  |  " +
             (f"three selections, pruned at {where}" if pruned else nothing))
    subtitle = (f"{source}, predicted {before} unpruned  |  k_anchors={config.k_anchors}, "
                f"top_m={config.top_m}  |  tokens {tokens_before} -> {tokens_after}")
    legend = ["anchor", "kept by the selection", "pruned"]
    caption = why_background(len(digit), n_patches, config.kept_patches, regime)
    note(f"drawing {args.out}...")
    figure, geo = render_panels(display_image(preprocess, pixels), grid, panels, title,
                                subtitle, legend, caption, COMPARE_PANEL)
    save_figure(figure, args.out)
    if pruned:
        print(f"{name}: {tokens_before} -> {tokens_after} tokens at {where}, on {source}; "
              f"prediction {before} unpruned (true label {label}); pruned:")
    else:
        print(f"{name}: nothing pruned, all {tokens_before} tokens kept (k_anchors + top_m = "
              f"{config.kept_patches} >= {n_patches} patches), on {source}; prediction "
              f"{before} unpruned (true label {label}); with each selection:")
    print("\n".join(lines))
    print(f"wrote {args.out} ({geo['size'][0]}x{geo['size'][1]})")
    return {"out": args.out, "panels": panels, "layout": geo, "title": title,
            "caption": caption}


def save_figure(figure, out):
    """Write the PNG (its folder made if missing; --out was checked before loading)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        figure.save(out)
    except (OSError, ValueError) as err:
        raise CLIError(f"--out {out}: cannot write the PNG ({err})") from err
