"""The pruning configuration: every parameter is validated here, once, when the config is made."""
import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NamedTuple, Optional, Tuple

SCORE_NORMS = ("none", "minmax")
BACKENDS = ("auto", "triton", "reference")
SELECTIONS = ("score", "cls", "mmr", "random")
# The controls a sweep runs at each of its token budgets: random patches, and the patches the
# class token attends to most (tokenprune.sweep.grid_points).
CONTROLS = ("random", "cls")
# The mmr selection's weight of relevance against redundancy (SPEC.md, section "`mmr`", says
# why this default).
MMR_LAMBDA = 0.8
# prune_image_tokens' defaults: a language model reads natural images, where objects are large,
# and there mmr keeps more than the seed's score (docs/vlm.md says why); 10 + 54 = 64 tokens.
IMAGE_TOKEN_SELECTION = "mmr"
IMAGE_TOKEN_TOP_M = 54


def _given(value):
    """A wrong-typed value as a message shows it: its type, then its repr ("float 1.0"), since
    1.0 or "3" alone reads like an acceptable integer."""
    return f"{type(value).__name__} {value!r}"


def _require_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {_given(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_unit_interval(name, value):
    if (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
            or not 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")


def _require_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _require_layer(name, value):
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer block index (negative counts from the end), "
                         f"got {_given(value)}")


class Stage(NamedTuple):
    """One stage of a pruning schedule: at block `layer`, keep k_anchors + top_m of the patches
    that reach it (SPEC.md, "Pruning at several blocks")."""

    layer: int
    k_anchors: int
    top_m: int

    def __repr__(self):  # as written: PruneConfig's repr then reads as the call that made it
        return repr(tuple(self))


def _stages(schedule):
    """The schedule as a tuple of Stages, every value checked (each error names the stage)."""
    if schedule is None:
        return ()
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise ValueError(f"schedule must be a sequence of (layer, k_anchors, top_m) stages, "
                         f"got {schedule!r}")
    stages = []
    for number, stage in enumerate(schedule, 1):
        if isinstance(stage, (str, bytes)) or not hasattr(stage, "__len__") or len(stage) != 3:
            raise ValueError(f"schedule stage {number} must be a (layer, k_anchors, top_m) triple, "
                             f"got {stage!r}")
        layer, k_anchors, top_m = stage
        _require_layer(f"schedule stage {number} layer", layer)
        _require_int(f"schedule stage {number} k_anchors", k_anchors, 1)
        _require_int(f"schedule stage {number} top_m", top_m, 0)
        stages.append(Stage(int(layer), int(k_anchors), int(top_m)))
    for number, (before, after) in enumerate(zip(stages, stages[1:]), 2):
        # Layers of different signs are ordered once the tower's depth is known (block_indices).
        if (before.layer < 0) == (after.layer < 0) and after.layer <= before.layer:
            raise ValueError(f"schedule blocks must be strictly increasing, got stage "
                             f"{number - 1} at block {before.layer} and stage {number} at block "
                             f"{after.layer}")
        kept_before, kept = before.k_anchors + before.top_m, after.k_anchors + after.top_m
        if kept >= kept_before:
            raise ValueError(f"schedule stage {number} must keep fewer patches than the "
                             f"{kept_before} that stage {number - 1} keeps, got k_anchors + top_m "
                             f"= {kept}")
    return tuple(stages)


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    k_anchors: patches chosen by the CLS token's attention, or by the attention they receive in
        a tower without a class token (>= 1).
    top_m: further patches kept by score (>= 0); the block keeps 1 + k_anchors + top_m tokens
        (p + k_anchors + top_m with p prefix tokens: class, registers, distillation).
    alpha: weight of importance against diversity in the score, in [0, 1].
    score_norm: "none" (the seed's formula) or "minmax" (rescale I and D to [0, 1] first).
    layer: index of the block that is replaced, in the tower's blocks (OpenCLIP's
        `visual.transformer.resblocks`, a timm trunk's `blocks`); negative values count from
        the end (-1, the default, is the last block).
    backend: "auto" (Triton on CUDA tensors when Triton is installed, else the reference),
        "triton" (error where it cannot run) or "reference" (PyTorch).
    selection: which patches are kept (docs/selections.md; alpha and score_norm are used by
        "score" only, mmr_lambda by "mmr" only):
        "score": the seed's k anchors + top_m by the importance/diversity score (the default);
        "cls": the k_anchors + top_m patches the class token attends to most (SPEC's anchor
            rule without a class token), FasterVLM's rule; the same keep_idx as "score" with
            k_anchors + top_m anchors and top_m = 0;
        "mmr": the k anchors, then top_m patches added one at a time by maximal marginal
            relevance, diversity against every patch kept so far (SPEC.md);
        "random": a control, k_anchors + top_m patches drawn uniformly at random per image,
            from a generator seeded with `seed` when the pruned block is made, so a run over
            the same batches draws the same patches.
    seed: the random control's seed (an integer >= 0).
    mmr_lambda: the mmr selection's weight of relevance (class-token attention) against
        redundancy (cosine to the patches kept), in [0, 1]; 1 is the cls selection's order.
    schedule: prune at several blocks: a sequence of (layer, k_anchors, top_m) stages, blocks
        strictly increasing, each keeping fewer patches than the stage before; each stage
        selects among the patches the earlier stages kept (SPEC.md, "Pruning at several
        blocks"). Give either schedule or layer / k_anchors / top_m: with a schedule those
        three become its last stage's. A one-stage schedule is that single cut (an equal
        config); the other settings (selection, alpha, backend...) are shared by every stage.
    """

    k_anchors: int = 10
    top_m: int = 50
    alpha: float = 0.5
    score_norm: str = "none"
    layer: int = -1
    backend: str = "auto"
    selection: str = "score"
    seed: int = 0
    # New fields go last, so that positional arguments keep their meaning.
    mmr_lambda: float = MMR_LAMBDA
    schedule: Tuple[Stage, ...] = ()

    def __post_init__(self):
        _require_int("k_anchors", self.k_anchors, 1)
        _require_int("top_m", self.top_m, 0)
        _require_unit_interval("alpha", self.alpha)
        _require_unit_interval("mmr_lambda", self.mmr_lambda)
        _require_layer("layer", self.layer)
        _require_choice("score_norm", self.score_norm, SCORE_NORMS)
        _require_choice("backend", self.backend, BACKENDS)
        _require_choice("selection", self.selection, SELECTIONS)
        _require_int("seed", self.seed, 0)
        stages = _stages(self.schedule)
        if stages:
            cut = (self.layer, self.k_anchors, self.top_m)
            if cut not in (_SINGLE_CUT, stages[-1]):
                raise ValueError(f"give the blocks and counts either in schedule or as layer, "
                                 f"k_anchors, top_m, not both: got layer={self.layer!r}, "
                                 f"k_anchors={self.k_anchors!r}, top_m={self.top_m!r} with "
                                 f"schedule={self.schedule!r}")
            # The last stage's values: kept_patches is then what leaves the last stage.
            object.__setattr__(self, "layer", stages[-1].layer)
            object.__setattr__(self, "k_anchors", stages[-1].k_anchors)
            object.__setattr__(self, "top_m", stages[-1].top_m)
        # A one-stage schedule is the single cut itself, equal to it as a config too.
        object.__setattr__(self, "schedule", stages if len(stages) > 1 else ())
        # Plain Python numbers from here on, whatever numeric type was passed in.
        object.__setattr__(self, "k_anchors", int(self.k_anchors))
        object.__setattr__(self, "top_m", int(self.top_m))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "mmr_lambda", float(self.mmr_lambda))
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def kept_patches(self) -> int:
        """The patches that leave the (last) pruned block: k_anchors + top_m."""
        return self.k_anchors + self.top_m

    @property
    def stages(self) -> Tuple[Stage, ...]:
        """(layer, k_anchors, top_m) of every stage, in order; one stage for a single cut."""
        return self.schedule or (Stage(self.layer, self.k_anchors, self.top_m),)

    def stage_configs(self) -> Tuple["PruneConfig", ...]:
        """One single-cut PruneConfig per stage (the other settings shared): what each stage's
        pruned block selects with."""
        if not self.schedule:
            return (self,)
        return tuple(dataclasses.replace(self, schedule=(), layer=stage.layer,
                                         k_anchors=stage.k_anchors, top_m=stage.top_m)
                     for stage in self.schedule)

    def block_indices(self, depth: int) -> Tuple[int, ...]:
        """Each stage's block index in a `depth`-block tower (negative layers count from the
        end); ValueError when one is outside the tower or they are not strictly increasing."""
        indices = []
        for number, stage in enumerate(self.stages, 1):
            name = f"schedule stage {number} layer" if self.schedule else "layer"
            if not -depth <= stage.layer < depth:
                raise ValueError(f"{name} must be in [{-depth}, {depth - 1}] for this "
                                 f"{depth}-block tower, got {stage.layer}")
            indices.append(stage.layer % depth)
        if any(after <= before for before, after in zip(indices, indices[1:])):
            raise ValueError(f"schedule blocks must be strictly increasing, got "
                             f"{', '.join(str(s.layer) for s in self.stages)}, which are blocks "
                             f"{', '.join(map(str, indices))} of this {depth}-block tower")
        return tuple(indices)


# layer, k_anchors and top_m as PruneConfig() has them: a schedule given with these is no
# conflict (they become the schedule's last stage's).
_SINGLE_CUT = (PruneConfig.layer, PruneConfig.k_anchors, PruneConfig.top_m)


def _check_ratio(ratio, top_m):
    if ratio is None:
        return
    if (isinstance(ratio, bool) or not isinstance(ratio, Real) or not math.isfinite(ratio)
            or not 0 < ratio <= 1):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if top_m is not None:
        raise ValueError(f"top_m={top_m!r} and ratio={ratio!r} were both given: the kept count "
                         f"would be ambiguous; give one of them")


@dataclass(frozen=True)
class ImageTokenConfig:
    """What `prune_image_tokens` runs with, as `pruned_block(model).config` reports it: the
    call's settings, checked when made (the errors are PruneConfig's), with top_m=None read as
    IMAGE_TOKEN_TOP_M when no ratio is given. Not a PruneConfig: its counts are per image, and
    it has no tower `layer` (the Qwen pruning state's `.layer` is the vision block it cuts at).

    How many tokens an image of n keeps: min(k_anchors + top_m, n); or, with `ratio` (top_m is
    then None, it does not apply), ceil(ratio * n), which differs from image to image (the
    pruning state's `kept(n)` for Qwen-VL; `image_seq_length` for LLaVA, whose images all have
    the same n). The first min(k_anchors, kept) of them are anchors, the rest are kept by
    `selection` (alpha and score_norm for "score", mmr_lambda for "mmr", seed for "random").
    """

    k_anchors: int = 10
    top_m: Optional[int] = None
    ratio: Optional[float] = None
    alpha: float = 0.5
    score_norm: str = "none"
    backend: str = "auto"
    selection: str = IMAGE_TOKEN_SELECTION
    mmr_lambda: float = MMR_LAMBDA
    seed: int = 0

    def __post_init__(self):
        _check_ratio(self.ratio, self.top_m)
        if self.ratio is None and self.top_m is None:
            object.__setattr__(self, "top_m", IMAGE_TOKEN_TOP_M)
        # PruneConfig checks (and normalises) every value these two share.
        checked = PruneConfig(k_anchors=self.k_anchors, top_m=self.top_m or 0, alpha=self.alpha,
                              score_norm=self.score_norm, backend=self.backend,
                              selection=self.selection, mmr_lambda=self.mmr_lambda,
                              seed=self.seed)
        for name in ("k_anchors", "alpha", "mmr_lambda", "seed"):
            object.__setattr__(self, name, getattr(checked, name))
        if self.top_m is not None:
            object.__setattr__(self, "top_m", checked.top_m)
        if self.ratio is not None:
            object.__setattr__(self, "ratio", float(self.ratio))

    @property
    def kept_patches(self) -> Optional[int]:
        """k_anchors + top_m, the most tokens an image keeps; None with a ratio, where the count
        depends on the image."""
        return None if self.top_m is None else self.k_anchors + self.top_m

    def selection_config(self, kept: int) -> PruneConfig:
        """The PruneConfig that selects `kept` tokens of an image with these settings:
        min(k_anchors, kept) anchors, then the rest by `selection`."""
        anchors = min(self.k_anchors, kept)
        return PruneConfig(k_anchors=anchors, top_m=kept - anchors, alpha=self.alpha,
                           score_norm=self.score_norm, backend=self.backend,
                           selection=self.selection, mmr_lambda=self.mmr_lambda, seed=self.seed)


def image_token_config(k_anchors=10, top_m=None, alpha=0.5, score_norm="none", backend="auto",
                       selection=IMAGE_TOKEN_SELECTION, mmr_lambda=MMR_LAMBDA, ratio=None):
    """prune_image_tokens' arguments checked before any model is touched: their
    ImageTokenConfig, or a ValueError that names the first bad one. The command line and
    tokenprune.lmms check them this way before anything loads."""
    return ImageTokenConfig(k_anchors=k_anchors, top_m=top_m, ratio=ratio, alpha=alpha,
                            score_norm=score_norm, backend=backend, selection=selection,
                            mmr_lambda=mmr_lambda)


# prune_image_tokens' pruning arguments and the kind of value each takes (`layer`, the Qwen-VL
# vision block to select at, is not an ImageTokenConfig field): the flags of `tokenprune
# generate` and the model arguments of tokenprune's lmms-eval models are these
# (tokenprune/cli/flags.py, tokenprune/lmms/).
IMAGE_TOKEN_ARGUMENTS = {"k_anchors": int, "top_m": int, "ratio": float, "alpha": float,
                         "selection": str, "mmr_lambda": float, "score_norm": str,
                         "backend": str, "layer": int}
