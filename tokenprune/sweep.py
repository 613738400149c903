"""The sweep's engine: every configuration of a grid on the same images, sharing the common work.

- `GridEncoder` / `encode_grid`: for one batch of images, the tower's output for every
  configuration of a grid (None = unpruned) and the kept patch indices. The batch goes once
  through the whole unpruned tower, which records the input of every block that some
  configuration prunes; each configuration then re-runs the tower with the blocks before its
  layer skipped and that recorded input injected, so it only pays for its own layer onwards
  (plus the patch embedding). A schedule resumes at its first stage's block, with every
  stage's pruned block in place. The outputs are those of the patched model, float for float.
- `grid_points`: the grid's settings (per selection) and the controls at each of its token
  budgets.
- `relative_cost`, `mean_tokens`: the tower's multiply-adds with pruning (a cut or a
  schedule), relative to unpruned; the tokens its blocks run on, on average.

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
from .patch import (follow_stages, pruned_block, pruned_blocks, remove_pruning,
                    replace_last_block, visual_tower)
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
    # Each stage's kept patch indices (one for a single cut), in the original token numbering;
    # keep_idx is the last.
    stage_keep_idx: tuple = ()


class GridEncoder:
    """Encode batches of images under every configuration of a grid, sharing the common work.

    `visual`: an unpruned OpenCLIP VisionTransformer (or a model holding one as `.visual`).
    `configs`: PruneConfigs (a single cut or a schedule), or None for the unpruned tower.
    Configurations whose (last stage's) k + m >= patches prune nothing: they get the unpruned
    output and keep_idx None.
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
        self.tower = find_tower(self.visual)
        self.blocks = self.tower.blocks
        patches = self.tower.num_patches
        self._pruned = {}  # position in configs -> [(block index, pruned block)], one per stage
        for i, config in enumerate(self.configs):
            if config is not None and config.kept_patches < patches:
                self._pruned[i] = _make_pruned_blocks(self.visual, config)
        self.layers = sorted({stages[0][0] for stages in self._pruned.values()})

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
            stages = self._pruned[i]
            with _resume_at(self.tower, stages, inputs[stages[0][0]]):
                output = self.forward(images)
            kept = tuple(block.last_keep_idx for _, block in stages)
            outputs.append(GridOutput(output, kept[-1], kept))
        return outputs


def encode_grid(visual, images, configs, forward=None):
    """The tower's output and keep_idx for `images` under each configuration (None = unpruned).
    For several batches, make one `GridEncoder` and call it on each (the random control's
    generator then carries over from batch to batch, as in a patched model)."""
    return GridEncoder(visual, configs, forward)(images)


def _make_pruned_blocks(visual, config):
    """[(block index, pruned block)] of every stage of `config`, in order, made by the public
    patching API (so its checks and errors, and the stages' links, are replace_last_block's),
    then taken out of the tower again. Kept for every batch: the random control's generator
    carries over as in one patched model."""
    replace_last_block(visual, config=config)
    try:
        blocks = tower_blocks(visual)
        return [(list(blocks).index(block), block) for block in pruned_blocks(visual)]
    finally:
        remove_pruning(visual)


@contextmanager
def _resume_at(tower, stages, block_input):
    """While active, the tower skips the blocks before the first stage's, runs each stage's
    pruned block at its index (the first on `block_input`, whatever reaches it) and the original
    blocks between and after them, with whatever must follow the kept tokens (rotary positions)
    hooked in as replace_last_block does."""
    blocks = tower.blocks
    originals = list(blocks)
    first, block = stages[0]
    handle = block.register_forward_pre_hook(lambda module, args: (block_input, *args[1:]))
    follow = []
    try:
        skip = _Skip()
        for i in range(first):
            blocks[i] = skip
        for index, stage in stages:
            blocks[index] = stage
        follow = follow_stages(tower, [index for index, _ in stages])
        yield
    finally:
        handle.remove()
        for hook in (hook for hooks in follow for hook in hooks):
            hook.remove()
        for i, original in enumerate(originals):
            blocks[i] = original


def relative_cost(tokens, kept_tokens, layer, depth, width, mlp_width, stages=None):
    """The tower's blocks' multiply-adds with pruning at `layer`, relative to unpruned; with
    `stages`, [(block index, tokens kept)] of a schedule in order, at every stage instead.

    A block on n tokens of width C costs n * (4 C^2 + 2 C F) (qkv, output projection, MLP of
    width F) plus 2 n^2 C (Q K^T and the weighted sum of V). A pruned block pays qkv and the
    selection's Q K^T on all T tokens that reach it (3 T C^2 + T^2 C), then the rest on the n
    kept ones; the blocks after it run on n tokens. The patch embedding, norms, pooling,
    projection and the selection's element-wise work are left out."""
    def block(n):
        return n * (4 * width ** 2 + 2 * width * mlp_width) + 2 * n ** 2 * width

    def pruned(T, n):
        return 3 * T * width ** 2 + T ** 2 * width + n * (width ** 2 + 2 * width * mlp_width) \
            + 2 * n ** 2 * width
    stages = [(layer, kept_tokens)] if stages is None else stages
    stages = [(index, n) for index, n in stages if n < tokens]  # a stage that keeps all: none
    if not stages:
        return 1.0
    cost, T = stages[0][0] * block(tokens), tokens
    for (index, n), end in zip(stages, [i for i, _ in stages[1:]] + [depth]):
        cost += pruned(T, n) + (end - index - 1) * block(n)
        T = n
    return cost / (depth * block(tokens))


def mean_tokens(tokens, stages, depth):
    """The tokens the tower's blocks run on, averaged over its `depth` blocks: `tokens` up to
    the first stage, then at each stage's block and after it the tokens it keeps. `stages`:
    [(block index, tokens kept)] in order (one for a single cut). The pruned block counts at
    what it keeps, as bench/token_merging.py's schedule_tokens and docs/performance.md count."""
    total, index, n = 0, 0, tokens
    for stage, kept in stages:
        total += (stage - index) * n
        index, n = stage, min(kept, n)
    return (total + (depth - index) * n) / depth


# ----- the grid -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One row of the results: a grid point or a control, named by its selection ("score",
    "mmr", "cls", "random"), or the unpruned model ("unpruned", config None)."""
    kind: str
    config: Optional[PruneConfig]


def grid_points(ks, ms, alphas, score_norms, layers, controls, depth, patches, backend, seed,
                selections=("score",), mmr_lambdas=(MMR_LAMBDA,), schedules=()):
    """The grid (every combination, duplicates dropped, layers as 0-based block indices) and
    one control row per kind for each distinct pruning shape (the blocks and the patches kept
    at each) that really prunes.

    Each selection multiplies only its own parameters: score points every alpha and
    score_norm, mmr points every mmr_lambda; cls and random points depend on the kept counts
    alone, so they are made as the controls are (k_anchors = k + m, top_m = 0) and a control
    that the grid already holds is not repeated. `schedules` (sequences of (layer, k_anchors,
    top_m) stages) replace layers x ks x ms: each schedule is one place of the grid, a
    one-stage schedule a single cut."""
    points = [Point("unpruned", None)]
    shapes = []

    def add(kind, config):
        point = Point(kind, config)
        if point not in points:
            points.append(point)
            shape = tuple((stage.layer, stage.k_anchors + stage.top_m) for stage in config.stages)
            if config.kept_patches < patches and shape not in shapes:
                shapes.append(shape)

    for selection in selections:
        settings = _selection_settings(selection, alphas, score_norms, mmr_lambdas)
        if schedules:
            places = product([tuple((layer % depth, k, m) for layer, k, m in schedule)
                              for schedule in schedules], settings)
        else:  # the order of the rows as it always was: layer, the settings, k, m
            places = ((((layer % depth, k, m),), setting)
                      for layer, setting, k, m in product(layers, settings, ks, ms))
        for stages, setting in places:
            if selection in CONTROLS:
                add(selection, _control(selection, [(layer, k + m) for layer, k, m in stages],
                                        backend, seed))
            else:
                add(selection, PruneConfig(schedule=stages, backend=backend, **setting))
    for shape, kind in product(list(shapes), [c for c in CONTROLS if c in controls]):
        add(kind, _control(kind, shape, backend, seed))
    return points


def _selection_settings(selection, alphas, score_norms, mmr_lambdas):
    """The PruneConfig settings a selection's grid points multiply (besides where they prune)."""
    if selection == "score":
        return [{"score_norm": norm, "alpha": alpha} for norm, alpha in product(score_norms, alphas)]
    if selection == "mmr":
        return [{"selection": "mmr", "mmr_lambda": lam} for lam in mmr_lambdas]
    return [{}]


def _control(kind, shape, backend, seed):
    """The cls or random selection of the kept patches at each (block index, kept) of `shape`,
    all of them "anchors" (the split into k and m means nothing to either; the random one uses
    `seed`)."""
    return PruneConfig(schedule=[(layer, kept, 0) for layer, kept in shape], backend=backend,
                       selection=kind, seed=seed)
