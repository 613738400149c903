"""The proxy task and the small trained ViTs shipped with the package.

A scikit-learn digit (8x8, upscaled) is pasted at a random place (a patch cell, jittered) on a
larger canvas of noise and random line segments, and which tokens a pruned model keeps decides
whether it can still read the digit. Two regimes (REGIMES), one model each:
- "small" (the first-run demo's model): the digit is 16 px, so it covers a small minority of
  the patches (1-4 of 64, 2.2 on average) and the class token's top patches cover it;
- "large": the same digits 64 px, covering 8 to 25 of the 64 patches (29% on average), so the
  class evidence is spread over many patches, as with most objects in natural images.
`tools/train_proxy.py [--regime large]` trains an OpenCLIP `VisionTransformer` (the class
tokenprune prunes) on a regime; the checkpoint and a JSON card describing it live in
`tokenprune/assets/`. The first-run demo, the tests and the benchmarks use this module's data
recipes, so everything sees the same held-out canvases.
"""
import functools
import json
from importlib import resources
from typing import NamedTuple

import numpy as np
import torch

# The data recipe: every parameter of make_canvas_digits, recorded in the checkpoint's JSON.
RECIPE = {
    "source": "sklearn.datasets.load_digits (1797 8x8 images, 16 grey levels, bundled)",
    "canvas": 128,            # canvas side in pixels
    "scale": 2,               # each digit pixel becomes scale x scale canvas pixels (16x16 digit)
    # The digit's corner is snapped to multiples of `grid` pixels (0: anywhere), then shifted by
    # up to `jitter` pixels each way, so its ink mostly lies in one 16-px patch and often spills
    # into the neighbours. With fully random places (the ViT must then assemble every digit
    # from several patches) a trial was still near chance after 15k canvases, where this recipe
    # had reached 79% held-out after 13k: too slow for the 15 CPU-minutes a retraining may take.
    "grid": 16,
    "jitter": 3,
    "noise_std": 0.1,         # Gaussian pixel noise on a 0.0 background, then clipped to [0, 1]
    "lines": (3, 7),          # number of distractor line segments, inclusive range
    "line_length": (10, 40),  # their length in pixels, inclusive range
    "line_intensity": (0.3, 0.7),
    "heldout_fraction": 0.3,  # of the 1797 source digits, never seen in training
    "split_seed": 0,          # the permutation that splits the source digits
}
CHANNELS = 3  # OpenCLIP's patch embedding takes RGB; the canvas is grey, repeated
# The model sees (canvas - PIXEL_MEAN) / PIXEL_STD (about the canvases' own statistics): on raw
# [0, 1] pixels the patch embeddings start small against the position embeddings, and a trial
# on a 4-patch version of the task reached 22% held-out after 400 steps against 46% normalised.
PIXEL_MEAN = 0.05
PIXEL_STD = 0.15

# The architecture of the shipped model: VisionTransformer(**ARCH), 8 x 8 = 64 patches of 16 px.
ARCH = {"image_size": 128, "patch_size": 16, "width": 128, "layers": 4, "heads": 4,
        "mlp_ratio": 4.0, "output_dim": 10}

CHECKPOINT = "proxy_vit.pt"
CARD = "proxy_vit.json"


class Regime(NamedTuple):
    recipe: dict  # make_canvas_digits' parameters (overrides of RECIPE)
    checkpoint: str  # file names in tokenprune/assets/
    card: str


REGIMES = {
    "small": Regime(RECIPE, CHECKPOINT, CARD),
    # 8 x 8 canvas pixels per digit pixel: a 64-px digit on 5 x 5 patch-cell places, each of
    # its patches holding 2 x 2 digit pixels. Its ink box overlaps 18.3 of the 64 patches on
    # average over the held-out canvases (8 to 25): no few patches carry the class.
    "large": Regime({**RECIPE, "scale": 8}, "proxy_vit_large.pt", "proxy_vit_large.json"),
}


def regime_of(name):
    """REGIMES[name], or an error naming the allowed regimes."""
    if name not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(map(repr, REGIMES))}, got {name!r}")
    return REGIMES[name]


@functools.lru_cache(maxsize=None)
def _load_digits():
    from sklearn.datasets import load_digits
    return load_digits()


def _source_digits(split, heldout_fraction, split_seed):
    digits = _load_digits()
    order = np.random.default_rng(split_seed).permutation(len(digits.target))
    n_heldout = int(round(heldout_fraction * len(order)))
    if split == "train":
        chosen = order[n_heldout:]
    elif split == "test":
        chosen = order[:n_heldout]
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return (digits.images[chosen] / 16.0).astype(np.float32), digits.target[chosen]


def _draw_line(canvas, rng, length_range, intensity_range):
    size = canvas.shape[0]
    x0, y0 = rng.uniform(0, size, 2)
    angle = rng.uniform(0, np.pi)
    length = rng.integers(length_range[0], length_range[1] + 1)
    value = rng.uniform(*intensity_range)
    steps = np.linspace(0, length, 2 * length + 1)
    xs = np.clip(np.round(x0 + steps * np.cos(angle)), 0, size - 1).astype(int)
    ys = np.clip(np.round(y0 + steps * np.sin(angle)), 0, size - 1).astype(int)
    canvas[ys, xs] = np.maximum(canvas[ys, xs], value)


def make_canvas_digits(n, seed, split="test", **recipe):
    """n canvases from the source digits of `split` ('train' or 'test'), deterministic in seed
    (an int or a sequence of ints, as numpy.random.default_rng takes).

    Returns (images, labels, boxes): float32 (n, 3, canvas, canvas) in [0, 1], int64 (n,),
    and int64 (n, 4), the digit's ink box (x0, y0, x1, y1) in pixels, ends exclusive.
    Keyword arguments override RECIPE's entries.
    """
    unknown = set(recipe) - set(RECIPE)
    if unknown:
        raise ValueError(f"unknown recipe parameters {sorted(unknown)}; allowed: {sorted(RECIPE)}")
    r = {**RECIPE, **recipe}
    sources, targets = _source_digits(split, r["heldout_fraction"], r["split_seed"])
    rng = np.random.default_rng(seed)
    size, scale = r["canvas"], r["scale"]
    side = 8 * scale
    images = np.empty((n, size, size), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        pick = rng.integers(len(targets))
        digit = np.kron(sources[pick], np.ones((scale, scale), dtype=np.float32))
        canvas = np.zeros((size, size), dtype=np.float32)
        for _ in range(rng.integers(r["lines"][0], r["lines"][1] + 1)):
            _draw_line(canvas, rng, r["line_length"], r["line_intensity"])
        if r["grid"]:
            x, y = rng.integers(0, (size - side) // r["grid"] + 1, 2) * r["grid"]
            if r["jitter"]:
                x, y = np.clip((x, y) + rng.integers(-r["jitter"], r["jitter"] + 1, 2),
                               0, size - side)
        else:
            x, y = rng.integers(0, size - side + 1, 2)
        region = canvas[y:y + side, x:x + side]
        np.maximum(region, digit, out=region)
        canvas += rng.normal(0.0, r["noise_std"], canvas.shape).astype(np.float32)
        images[i] = np.clip(canvas, 0.0, 1.0)
        labels[i] = targets[pick]
        rows, cols = np.nonzero(digit > 0)
        boxes[i] = (x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1)
    images = torch.from_numpy(images)[:, None].expand(n, CHANNELS, size, size).contiguous()
    return images, torch.from_numpy(labels), torch.from_numpy(boxes)


def preprocess():
    """The model's input transform of a canvas batch (a torchvision Normalize, so that
    `tokenprune visualize` can undo it for display like OpenCLIP's own preprocessing)."""
    from torchvision.transforms import Compose, Normalize
    return Compose([Normalize([PIXEL_MEAN] * CHANNELS, [PIXEL_STD] * CHANNELS)])


def object_patches(boxes, image_size=ARCH["image_size"], patch_size=ARCH["patch_size"]):
    """Bool (n, N): which patches (raster order, token index - 1) overlap each box."""
    grid = image_size // patch_size
    starts = torch.arange(grid) * patch_size
    ends = starts + patch_size
    cols = (starts[None] < boxes[:, 2:3]) & (ends[None] > boxes[:, 0:1])  # (n, grid)
    rows = (starts[None] < boxes[:, 3:4]) & (ends[None] > boxes[:, 1:2])
    return (rows[:, :, None] & cols[:, None, :]).reshape(len(boxes), grid * grid)


def build_proxy_model(**arch):
    """A fresh (untrained) VisionTransformer of the proxy's architecture; `visual(x)` = logits."""
    from open_clip.transformer import VisionTransformer
    return VisionTransformer(**{**ARCH, **arch})


def _asset(name):
    return resources.files("tokenprune").joinpath("assets", name)


def proxy_card(regime="small"):
    """The JSON beside a regime's checkpoint: architecture, data recipe, seed, command,
    accuracy."""
    return json.loads(_asset(regime_of(regime).card).read_text(encoding="utf-8"))


def load_proxy_model(regime="small"):
    """A regime's shipped trained model in float32, eval mode, on the CPU, and its card."""
    card = proxy_card(regime)
    model = build_proxy_model(**card["arch"])
    with _asset(regime_of(regime).checkpoint).open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    model.load_state_dict({name: value.float() for name, value in state.items()})
    return model.eval(), card


def heldout_set(n, card=None, regime="small"):
    """The first n canvases of the held-out set the card's accuracy was measured on (the
    regime's card when none is given)."""
    card = card or proxy_card(regime)
    recipe = {key: tuple(v) if isinstance(v, list) else v for key, v in card["recipe"].items()}
    return make_canvas_digits(n, card["heldout_seed"], split="test", **recipe)


DEMO_INDEX = 0  # which held-out canvas `tokenprune visualize` draws


def describe(card):
    """One line: what the shipped model is."""
    arch, recipe = card["arch"], card["recipe"]
    grid = arch["image_size"] // arch["patch_size"]
    return (f"a small ViT ({arch['layers']} blocks, width {arch['width']}, {grid}x{grid} patches "
            f"of {arch['patch_size']} px) trained on scikit-learn's digits pasted on "
            f"{recipe['canvas']}x{recipe['canvas']} canvases of noise and lines, shipped with "
            f"tokenprune (held-out accuracy {100 * card['heldout_accuracy']:.1f}%)")


def demo_inputs(index=DEMO_INDEX):
    """The first-run demo: (model, pixels (1, 3, H, W), preprocess, label, card)."""
    model, card = load_proxy_model()
    images, labels, _ = heldout_set(index + 1, card)
    normalize = preprocess()
    return model, normalize(images[index:index + 1]), normalize, int(labels[index]), card
