"""The counts and grids of units, family-blind: a unit is what the language model receives as one
image token (a merged group of patches, or one patch), and an image of n units keeps kept(n)."""
import math

import torch

RATIO_TOLERANCE = 1e-6


def kept_count(n, kept_patches, ratio):
    """Units an image of n units keeps: min(k + m, n), or ceil(ratio * n) with a product within
    RATIO_TOLERANCE of an integer taken as that integer, at least 1."""
    if ratio is None:
        return min(kept_patches, n)
    product = ratio * n
    nearest = round(product)
    count = nearest if abs(product - nearest) <= RATIO_TOLERANCE else math.ceil(product)
    return min(n, max(1, count))  # a ratio near 0 still keeps one


def image_units(grid_thw, merge):
    """Units per image, a list of ints, for image_grid_thw (images, 3): t * h * w / merge^2."""
    return [int(t * h * w) // (merge * merge) for t, h, w in grid_thw.tolist()]


def unit_offsets(grid_thw_row, merge, device):
    """(3, n) int64: each unit's (temporal, height, width) offset from the image's start
    position, in the order the tower outputs the units (t, then rows, then columns)."""
    t, h, w = (int(v) for v in grid_thw_row)
    grid = torch.meshgrid(torch.arange(t, device=device), torch.arange(h // merge, device=device),
                          torch.arange(w // merge, device=device), indexing="ij")
    return torch.stack(grid).reshape(3, -1)
