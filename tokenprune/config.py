"""The pruning configuration: every parameter is validated here, once, when the config is made."""
import math
from dataclasses import dataclass
from numbers import Integral, Real

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


def _require_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_unit_interval(name, value):
    if (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
            or not 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")


def _require_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


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
    """

    k_anchors: int = 10
    top_m: int = 50
    alpha: float = 0.5
    score_norm: str = "none"
    layer: int = -1
    backend: str = "auto"
    selection: str = "score"
    seed: int = 0
    mmr_lambda: float = MMR_LAMBDA  # last, so that positional arguments keep their meaning

    def __post_init__(self):
        _require_int("k_anchors", self.k_anchors, 1)
        _require_int("top_m", self.top_m, 0)
        _require_unit_interval("alpha", self.alpha)
        _require_unit_interval("mmr_lambda", self.mmr_lambda)
        if isinstance(self.layer, bool) or not isinstance(self.layer, Integral):
            raise ValueError(f"layer must be an integer block index (negative counts from the end), "
                             f"got {self.layer!r}")
        _require_choice("score_norm", self.score_norm, SCORE_NORMS)
        _require_choice("backend", self.backend, BACKENDS)
        _require_choice("selection", self.selection, SELECTIONS)
        _require_int("seed", self.seed, 0)
        # Plain Python numbers from here on, whatever numeric type was passed in.
        object.__setattr__(self, "k_anchors", int(self.k_anchors))
        object.__setattr__(self, "top_m", int(self.top_m))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "mmr_lambda", float(self.mmr_lambda))
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def kept_patches(self) -> int:
        return self.k_anchors + self.top_m


def _check_ratio(ratio, top_m):
    if ratio is None:
        return
    if (isinstance(ratio, bool) or not isinstance(ratio, Real) or not math.isfinite(ratio)
            or not 0 < ratio <= 1):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if top_m is not None:
        raise ValueError(f"top_m={top_m!r} and ratio={ratio!r} were both given: the kept count "
                         f"would be ambiguous; give one of them")


def image_token_config(k_anchors=10, top_m=None, alpha=0.5, score_norm="none", backend="auto",
                       selection=IMAGE_TOKEN_SELECTION, mmr_lambda=MMR_LAMBDA, ratio=None):
    """prune_image_tokens' arguments checked before any model is touched: their PruneConfig
    (top_m None is IMAGE_TOKEN_TOP_M), or a ValueError that names the first bad one. The command
    line and tokenprune.lmms check them this way before anything loads."""
    _check_ratio(ratio, top_m)
    return PruneConfig(k_anchors=k_anchors, top_m=IMAGE_TOKEN_TOP_M if top_m is None else top_m,
                       alpha=alpha, score_norm=score_norm, backend=backend,
                       selection=selection, mmr_lambda=mmr_lambda)
