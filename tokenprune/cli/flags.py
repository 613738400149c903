"""The flags that more than one command takes, each declared once, here: the pruning flags of
`eval`, `sweep`, `visualize` and `generate` (FLAGS), and --device, --tokenizer and --verbose.

Where a pruning flag's parts come from:
- its name and the kind of its value: the library's. The ViT commands take PruneConfig's fields
  (VIT_FLAGS); `generate` takes prune_image_tokens' arguments, config.IMAGE_TOKEN_ARGUMENTS,
  which are also the model arguments of tokenprune's lmms-eval models (tokenprune/lmms/);
- its default: PruneConfig's, or ImageTokenConfig's for `generate`;
- what it accepts, in --help: the words of the config's own check (`allowed`);
- what it means (to `generate` too, where that differs: --layer is a Qwen-VL vision block),
  and what a sweep's list of it holds: FLAGS, the only text written here.
The config checks the values (prune_config here; the sweep's lists; generate's
image_token_config). A command that does not take a flag does not add it.

Nothing heavy is imported: every command's parser is built from here, for --help too.
"""
import argparse
from dataclasses import fields
from typing import NamedTuple, Optional, get_type_hints

from ..config import (BACKENDS, IMAGE_TOKEN_ARGUMENTS, IMAGE_TOKEN_TOP_M, SCORE_NORMS,
                      SELECTIONS, ImageTokenConfig, PruneConfig)
from .common import CLIError


class Flag(NamedTuple):
    means: str                  # for every command that takes the flag
    grid: Optional[str] = None  # what `tokenprune sweep`'s list of it holds; None: one value
    vlm: Optional[str] = None   # what it means to `generate`, where that differs


FLAGS = {
    "--k_anchors": Flag("anchor patches: the ones the class token attends to most (without a "
                        "class token, the ones that receive the most attention)",
                        grid="integers >= 1"),
    "--top_m": Flag("further patches kept by the selection", grid="integers >= 0"),
    "--ratio": Flag("keep ceil(ratio * n) of an image's n tokens instead of k_anchors + top_m; "
                    "not with --top_m"),
    "--alpha": Flag("the score selection's weight of importance against diversity",
                    grid="numbers in [0, 1]"),
    "--score_norm": Flag("how the score selection mixes importance and diversity: 'none' (the "
                         "seed's formula) or 'minmax' (each rescaled to [0, 1] first)",
                         grid=f"any of {', '.join(SCORE_NORMS)}"),
    "--layer": Flag("the pruned block of the image tower, counting from 0",
                    grid="block indices, negative from the end",
                    vlm="Qwen-VL only: select at this vision block and run it and the later "
                        "blocks on the kept tokens only (negative counts from the end; "
                        "Qwen2.5-VL: a full-attention block); default: the last block's input, "
                        "every block on every patch (docs/vlm.md)"),
    "--backend": Flag("'auto' (Triton on CUDA, else PyTorch), 'triton' or 'reference'"),
    "--selection": Flag("which patches are kept (docs/selections.md): 'score' (the anchors, then "
                        "the seed's importance/diversity score), 'cls' (the k + m the class "
                        "token attends to most), 'mmr' (the anchors, then maximal marginal "
                        "relevance against every kept patch) or 'random'",
                        grid=f"any of {', '.join(SELECTIONS)}; alpha and score_norm multiply the "
                             "score points only, mmr_lambda the mmr points only"),
    "--mmr_lambda": Flag("--selection mmr: its weight of attention (relevance) against likeness "
                         "to the patches kept so far (redundancy)",
                         grid="numbers in [0, 1]"),
    "--schedule": Flag("prune at several blocks instead of one: stages LAYER:K_ANCHORS:TOP_M "
                       "separated by commas, blocks increasing, each stage keeping fewer "
                       "patches than the one before and selecting among them (e.g. "
                       "3:4:20,6:2:10); replaces --layer, --k_anchors and --top_m",
                       grid="schedules to grid over instead of --layer x --k_anchors x --top_m: "
                            "each value one schedule, stages LAYER:K_ANCHORS:TOP_M separated by "
                            "commas, as eval's --schedule (e.g. 3:10:90,6:10:50 6:10:50; one "
                            "stage is a single cut); summary.md says which wins at each budget"),
}
# The PruneConfig fields that eval, visualize and sweep take, in --help's order (not `seed`:
# the random selection's seed is 0 in eval; sweep's --seed is CLIP_benchmark's).
VIT_FLAGS = ("k_anchors", "top_m", "alpha", "score_norm", "layer", "backend", "selection",
             "mmr_lambda", "schedule")
PRUNING_DEFAULTS = {f.name: f.default for f in fields(PruneConfig) if f.name in VIT_FLAGS}
# generate's defaults: ImageTokenConfig's (top_m None: IMAGE_TOKEN_TOP_M unless --ratio), and
# for `layer`, which it has no field for, prune_image_tokens' None (the last block).
IMAGE_TOKEN_DEFAULTS = {name: {f.name: f.default for f in fields(ImageTokenConfig)}.get(name)
                        for name in IMAGE_TOKEN_ARGUMENTS}
# The flags that sweep takes as lists of values (and --schedule, a list of schedules).
GRID_FLAGS = tuple(name for name in VIT_FLAGS if name != "schedule" and FLAGS[f"--{name}"].grid)
# The flags that a --schedule replaces: each of its stages gives them.
SCHEDULE_REPLACES = ("layer", "k_anchors", "top_m")
CHOICES = {"score_norm": SCORE_NORMS, "backend": BACKENDS, "selection": SELECTIONS}

_NOT_A_VALUE = object()


def allowed(config, name):
    """What `config` (PruneConfig or ImageTokenConfig) accepts for its field `name`, in the words
    of its own check ("an integer >= 1"): the "must be ..." of the ValueError it raises for a
    value of no kind it takes. None for a name it has no field for."""
    try:
        config(**{name: _NOT_A_VALUE})
    except ValueError as err:
        return str(err).partition(" must be ")[2].rpartition(", got ")[0] or None
    except TypeError:
        return None
    raise AssertionError(f"{config.__name__} took {name}={_NOT_A_VALUE!r}")


def _kind(name):
    """The type of PruneConfig's field `name` (int, float, str)."""
    return get_type_hints(PruneConfig)[name]


def _help(option, config, default):
    """A single-value flag's help: what it means; what `config` accepts (choices show
    themselves); the default, as text."""
    name = option[2:]
    accepts = None if name in CHOICES else allowed(config, name)
    return f"{FLAGS[option].means}; {accepts + ', ' if accepts else ''}default {default}"


def parse_schedule(text):
    """--schedule's value, stages LAYER:K_ANCHORS:TOP_M separated by commas, as ((layer, k, m),
    ...) integers; PruneConfig checks what the numbers may be."""
    stages = [stage.strip().split(":") for stage in text.split(",")]
    try:
        if any(len(stage) != 3 for stage in stages):
            raise ValueError
        return tuple(tuple(int(number) for number in stage) for stage in stages)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be stages LAYER:K_ANCHORS:TOP_M separated by "
                                         f"commas, e.g. 3:4:20,6:2:10, got {text!r}") from None


def schedule_text(stages):
    """A schedule as --schedule writes it: 3:10:90,6:10:50."""
    return ",".join(":".join(map(str, stage)) for stage in stages)


# ----- the pruning flags, per command -------------------------------------------------------

def add_pruning_flags(parser, enable_flag=True, unset=None):
    """eval's and visualize's pruning flags (VIT_FLAGS, PruneConfig's defaults) in a group of
    `parser`; with `enable_flag`, --enable_pruning (eval prunes only when it is given). Each name
    in `unset` gets default None (the command fills it in once it knows the model) and
    `unset[name]` as its default in --help."""
    unset = unset or {}
    group = parser.add_argument_group(
        "token pruning (tokenprune)",
        "Keep the prefix tokens (CLS) + k_anchors + top_m patches at one block of the image "
        "tower (or, with --schedule, at several).")
    if enable_flag:
        group.add_argument("--enable_pruning", action="store_true", default=False,
                           help="prune visual tokens (default: off, plain CLIP_benchmark)")
    for name in VIT_FLAGS:
        option = f"--{name}"
        if name == "schedule":
            group.add_argument(option, type=parse_schedule, default=PRUNING_DEFAULTS[name],
                               metavar="LAYER:K:M,...", help=FLAGS[option].means)
            continue
        group.add_argument(option, type=_kind(name), choices=CHOICES.get(name),
                           default=None if name in unset else PRUNING_DEFAULTS[name],
                           help=_help(option, PruneConfig, unset.get(name, "%(default)s")))
    return group


def add_grid_flags(parser, grid):
    """sweep's pruning flags: a list for each flag with a `grid` text, of PruneConfig's kind, with
    `grid[name]` as its default (checked by the sweep against PruneConfig, value by value, so
    that the error is PruneConfig's); --schedule, a list of schedules; one --backend. Returns
    the group, for the sweep's other flags."""
    group = parser.add_argument_group("sweep (tokenprune)")
    for name in VIT_FLAGS:
        option = f"--{name}"
        flag = FLAGS[option]
        if name in GRID_FLAGS:
            group.add_argument(option, type=_kind(name), nargs="*", default=grid[name],
                               help=f"{flag.means}; {flag.grid} (default: "
                                    f"{' '.join(map(str, grid[name]))})")
        elif name == "schedule":
            group.add_argument(option, type=parse_schedule, nargs="*", default=[],
                               metavar="LAYER:K:M,...", help=flag.grid)
        else:
            group.add_argument(option, choices=CHOICES.get(name), default=PRUNING_DEFAULTS[name],
                               help=_help(option, PruneConfig, "%(default)s"))
    return group


def add_image_token_flags(parser):
    """generate's pruning flags: prune_image_tokens' arguments (IMAGE_TOKEN_ARGUMENTS) with
    ImageTokenConfig's defaults."""
    group = parser.add_argument_group(
        "token pruning (tokenprune)",
        "The language model sees k_anchors + top_m image tokens per image (or, with --ratio, "
        "that fraction of them), selected at the vision block whose output LLaVA uses, or at a "
        "Qwen-VL tower's last block (or its block --layer).")
    k = IMAGE_TOKEN_DEFAULTS["k_anchors"]
    shown = {"top_m": f"{IMAGE_TOKEN_TOP_M}: {k + IMAGE_TOKEN_TOP_M} image tokens per image "
                      "with the default k_anchors",
             "ratio": "none: k_anchors + top_m"}
    for name, kind in IMAGE_TOKEN_ARGUMENTS.items():
        option = f"--{name}"
        if name == "layer":  # checked once the model is known: no config says what it takes
            group.add_argument(option, type=kind, default=IMAGE_TOKEN_DEFAULTS[name],
                               help=FLAGS[option].vlm)
            continue
        group.add_argument(option, type=kind, choices=CHOICES.get(name),
                           default=IMAGE_TOKEN_DEFAULTS[name],
                           help=_help(option, ImageTokenConfig, shown.get(name, "%(default)s")))
    return group


def prune_config(args):
    """The PruneConfig of the parsed pruning flags; a bad value is a CLIError naming the flag."""
    # A command without --schedule (visualize) keeps PruneConfig's default for it.
    values = {name: getattr(args, name, default) for name, default in PRUNING_DEFAULTS.items()}
    if values["schedule"]:
        given = [f"--{name} {values[name]}" for name in SCHEDULE_REPLACES
                 if values[name] != PRUNING_DEFAULTS[name]]
        if given:
            raise CLIError(f"--schedule gives every stage's block and counts: leave out "
                           f"{', '.join(given)}")
    try:
        return PruneConfig(**values)
    except ValueError as err:
        raise CLIError(f"--{err}") from err


# ----- the other flags that several commands take --------------------------------------------

def add_device_flag(parser):
    """visualize's and generate's --device (check_device resolves it, once torch is imported)."""
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")


def add_tokenizer_flag(parser):
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="folder holding the model's text tokenizer, saved with "
                             "transformers' save_pretrained: for models whose tokenizer "
                             "OpenCLIP loads from the Hugging Face hub (SigLIP, SigLIP2, ...), "
                             "where the hub cannot be reached")


def add_verbose_flag(parser):
    parser.add_argument("--verbose", dest="show_warnings", action="store_true", default=False,
                        help="also show the third-party warnings that tokenprune hides as "
                             "known to be harmless here")


def add_tokenprune_eval_flags(parser):
    """What tokenprune adds to CLIP_benchmark's eval flags: on the light parser's copy of them
    (commands/eval.py) and on CLIP_benchmark's own parser (evaluate.eval_parser)."""
    add_pruning_flags(parser)
    add_tokenizer_flag(parser)
    add_verbose_flag(parser)
