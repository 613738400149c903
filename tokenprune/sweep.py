"""The sweep's engine: every configuration of a grid on the same images, sharing the common work.

- `GridEncoder` / `encode_grid`: for one batch of images, the tower's output for every
  configuration of a grid (None = unpruned) and the kept patch indices. The batch goes once
  through the whole unpruned tower, which records the input of every block that some
  configuration prunes; each configuration then re-runs the tower with the blocks before its
  layer skipped and that recorded input injected, so it only pays for its own layer onwards
  (plus the patch embedding). The outputs are those of the patched model, float for float.
- `grid_points`: the grid's settings (per selection) and the controls at each of its token
  budgets.
- `relative_cost`: the tower's multiply-adds with pruning, relative to unpruned.

`tokenprune sweep` (tokenprune/cli/sweep.py) is the command built on this engine.
"""
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from .config import CONTROLS, MMR_LAMBDA, PruneConfig
from .patch import pruned_block, remove_pruning, replace_last_block, visual_tower
from .towers import find_tower

# ----- the engine ---------------------------------------------------------------------------

def tower_blocks(visual):
    """The tower's blocks, in the order they run (tokenprune/towers/ knows where each family
    keeps them)."""
    return find_tower(visual).blocks


def tower_patches(visual):
    """The number of patch tokens the tower's blocks see."""
    return find_tower(visual).num_patches


def block_widths(block):
    """(C, F): a block's width and its MLP's hidden width, from the MLP's first linear layer."""
    first = next(m for m in block.mlp.modules() if isinstance(m, nn.Linear))
    return first.in_features, first.out_features


class _Skip(nn.Module):
    """Stands in for a block whose output is already known: passes its input through."""

    def forward(self, x, *args, **kwargs):
        return x


class GridOutput(NamedTuple):
    output: torch.Tensor  # what `forward(images)` returned under this configuration
    keep_idx: Optional[torch.Tensor]  # (B, k + m) kept patch indices; None when nothing was pruned


class GridEncoder:
    """Encode batches of images under every configuration of a grid, sharing the common work.

    `visual`: an unpruned OpenCLIP VisionTransformer (or a model holding one as `.visual`).
    `configs`: PruneConfigs, or None for the unpruned tower. Configurations with
    k + m >= patches prune nothing: they get the unpruned output and keep_idx None.
    `forward`: what is called on the images (default: the tower itself; `model.encode_image`
    gives exactly what the patched model's `encode_image` gives).

    The pruned blocks are made once here and reused for every batch, so the random control
    draws the same patches as one patched model run over the same batches would.
    """

    def __init__(self, visual, configs, forward=None):
        self.visual = visual_tower(visual)
        self.forward = forward if forward is not None else self.visual
        self.configs = list(configs)
        if pruned_block(self.visual) is not None:
            raise ValueError("GridEncoder needs an unpruned tower: call remove_pruning(model) first")
        for config in self.configs:
            if config is not None and config.schedule:
                raise ValueError(f"GridEncoder runs one cut per configuration, got a schedule of "
                                 f"{len(config.schedule)} stages (sweeps over schedules are not "
                                 f"supported yet)")
        self.tower = find_tower(self.visual)
        self.blocks = self.tower.blocks
        patches = self.tower.num_patches
        self._pruned = {}  # position in configs -> (block index, pruned block)
        for i, config in enumerate(self.configs):
            if config is not None and config.kept_patches < patches:
                self._pruned[i] = _make_pruned_block(self.visual, config)
        self.layers = sorted({layer for layer, _ in self._pruned.values()})

    def __call__(self, images):
        """One GridOutput per configuration, in the order of `configs`."""
        inputs = {}

        def record(layer, module, args):
            inputs[layer] = args[0].clone()  # a later in-place op must not change what we keep

        hooks = [self.blocks[layer].register_forward_pre_hook(functools.partial(record, layer))
                 for layer in self.layers]
        try:
            unpruned = self.forward(images)
        finally:
            for hook in hooks:
                hook.remove()
        outputs = []
        for i in range(len(self.configs)):
            if i not in self._pruned:
                outputs.append(GridOutput(unpruned, None))
                continue
            layer, block = self._pruned[i]
            with _resume_at(self.tower, layer, block, inputs[layer]):
                output = self.forward(images)
            outputs.append(GridOutput(output, block.last_keep_idx))
        return outputs


def encode_grid(visual, images, configs, forward=None):
    """The tower's output and keep_idx for `images` under each configuration (None = unpruned).
    For several batches, make one `GridEncoder` and call it on each (the random control's
    generator then carries over from batch to batch, as in a patched model)."""
    return GridEncoder(visual, configs, forward)(images)


def _make_pruned_block(visual, config):
    """(block index, pruned block) for `config`, made by the public patching API (so its checks
    and errors are the ones replace_last_block gives), then taken out of the tower again."""
    replace_last_block(visual, config=config)
    try:
        blocks = tower_blocks(visual)
        index = config.layer % len(blocks)
        return index, blocks[index]
    finally:
        remove_pruning(visual)


@contextmanager
def _resume_at(tower, layer, block, block_input):
    """While active, the tower skips blocks[:layer], runs `block` at `layer` on `block_input`
    (whatever reaches it), then the original later blocks, with whatever must follow the kept
    tokens into them (rotary positions) hooked in as replace_last_block does."""
    blocks = tower.blocks
    originals = list(blocks[:layer + 1])
    skip = _Skip()
    handle = block.register_forward_pre_hook(lambda module, args: (block_input, *args[1:]))
    follow = tower.family.follow(block, list(blocks)[layer + 1:])
    try:
        for i in range(layer):
            blocks[i] = skip
        blocks[layer] = block
        yield
    finally:
        handle.remove()
        for hook in follow:
            hook.remove()
        for i, original in enumerate(originals):
            blocks[i] = original


def relative_cost(tokens, kept_tokens, layer, depth, width, mlp_width):
    """The tower's blocks' multiply-adds with pruning at `layer`, relative to unpruned.

    A block on n tokens of width C costs n * (4 C^2 + 2 C F) (qkv, output projection, MLP of
    width F) plus 2 n^2 C (Q K^T and the weighted sum of V). The pruned block pays qkv and the
    selection's Q K^T on all T tokens (3 T C^2 + T^2 C), then the rest on the n kept ones;
    the blocks after it run on n tokens. The patch embedding, norms, pooling, projection and
    the selection's element-wise work are left out."""
    def block(n):
        return n * (4 * width ** 2 + 2 * width * mlp_width) + 2 * n ** 2 * width
    T, n = tokens, kept_tokens
    if n >= T:
        return 1.0
    pruned = 3 * T * width ** 2 + T ** 2 * width + n * (width ** 2 + 2 * width * mlp_width) \
        + 2 * n ** 2 * width
    return (layer * block(T) + pruned + (depth - layer - 1) * block(n)) / (depth * block(T))


# ----- the grid -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One row of the results: a grid point or a control, named by its selection ("score",
    "mmr", "cls", "random"), or the unpruned model ("unpruned", config None)."""
    kind: str
    config: Optional[PruneConfig]


def grid_points(ks, ms, alphas, score_norms, layers, controls, depth, patches, backend, seed,
                selections=("score",), mmr_lambdas=(MMR_LAMBDA,)):
    """The grid (every combination, duplicates dropped, layers as 0-based block indices) and
    one control row per kind for each distinct (block, kept patches) that really prunes.

    Each selection multiplies only its own parameters: score points every alpha and
    score_norm, mmr points every mmr_lambda; cls and random points depend on k + m alone, so
    they are made as the controls are (k_anchors = k + m, top_m = 0) and a control that the
    grid already holds is not repeated."""
    points = [Point("unpruned", None)]
    budgets = []

    def add(kind, config):
        point = Point(kind, config)
        if point not in points:
            points.append(point)
            if config.kept_patches < patches and (config.layer, config.kept_patches) not in budgets:
                budgets.append((config.layer, config.kept_patches))

    for selection in selections:
        if selection == "score":
            for layer, norm, alpha, k, m in product(layers, score_norms, alphas, ks, ms):
                add("score", PruneConfig(k_anchors=k, top_m=m, alpha=alpha, score_norm=norm,
                                         layer=layer % depth, backend=backend))
        elif selection == "mmr":
            for layer, lam, k, m in product(layers, mmr_lambdas, ks, ms):
                add("mmr", PruneConfig(k_anchors=k, top_m=m, layer=layer % depth,
                                       backend=backend, selection="mmr", mmr_lambda=lam))
        else:
            for layer, k, m in product(layers, ks, ms):
                add(selection, _control(selection, layer % depth, k + m, backend, seed))
    for (layer, kept), kind in product(list(budgets), [c for c in CONTROLS if c in controls]):
        add(kind, _control(kind, layer, kept, backend, seed))
    return points


def _control(kind, layer, kept, backend, seed):
    """The cls or random selection of `kept` patches at block `layer`, all of them "anchors"
    (the split into k and m means nothing to either; the random one uses `seed`)."""
    return PruneConfig(k_anchors=kept, top_m=0, layer=layer, backend=backend, selection=kind,
                       seed=seed)
