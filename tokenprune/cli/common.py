"""What every `tokenprune` subcommand shares: the error type main() prints, the pruning flags,
the checks made before a model is loaded, the translation of loading failures, and the quieting
of known-harmless third-party warnings.

Importing this module costs nothing: torch and open_clip are imported inside the functions
that need them, so that `--help` and bad flags are answered at once.
"""
import argparse
import difflib
import functools
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from itertools import product
from typing import NamedTuple

from ..config import BACKENDS, CONTROLS, MMR_LAMBDA, SCORE_NORMS, SELECTIONS, PruneConfig
from .swap import swapped

PROG = "tokenprune"
DEFAULT_DATASET_ROOT = "root"  # CLIP_benchmark's --dataset_root default
DEBUG_ENV = "TOKENPRUNE_DEBUG"
# The PruneConfig fields that have a flag (`--k_anchors` ...); any other field keeps its
# PruneConfig default. The flags' defaults are PruneConfig's (the seed's k_anchors 10, top_m 50,
# alpha 0.5, and ours).
PRUNING_FLAGS = ("k_anchors", "top_m", "alpha", "score_norm", "layer", "backend", "selection",
                 "mmr_lambda", "schedule")
# The flags that a --schedule replaces: each of its stages gives them.
SCHEDULE_REPLACES = ("layer", "k_anchors", "top_m")
PRUNING_DEFAULTS = {name: value for name, value in asdict(PruneConfig()).items()
                    if name in PRUNING_FLAGS}
# `tokenprune sweep`: the list-valued pruning flags (each a PruneConfig field) -> (type, what
# is allowed), their defaults (the original description's tuning ranges: k_anchors 5-20,
# top_m 30-100, alpha 0.3-0.7) and the controls at each grid point's token count.
LIST_FLAGS = {
    "k_anchors": (int, "integers >= 1"),
    "top_m": (int, "integers >= 0"),
    "alpha": (float, "numbers in [0, 1]"),
    "score_norm": (str, f"{' or '.join(SCORE_NORMS)}"),
    "layer": (int, "block indices, negative from the end"),
    "selection": (str, f"any of {', '.join(SELECTIONS)}; alpha and score_norm multiply the "
                       "score points only, mmr_lambda the mmr points only"),
    "mmr_lambda": (float, "numbers in [0, 1], the mmr selection's weight of CLS attention"),
}
LIST_DEFAULTS = {"k_anchors": [5, 10, 20], "top_m": [30, 50, 100], "alpha": [0.3, 0.5, 0.7],
                 "score_norm": ["none"], "layer": [-1], "selection": ["score"],
                 "mmr_lambda": [MMR_LAMBDA]}
# What `tokenprune sweep` writes into --output_dir.
SWEEP_OUTPUT_FILES = ("results.csv", "results.json", "accuracy_vs_tokens.png", "summary.md")
# `tokenprune visualize`'s k and m for the small ViT shipped with the package (tokenprune/proxy.py):
# 16 of its 64 patches kept, as 60 of ViT-B/16's 196 are with the defaults above.
SHIPPED_MODEL_PRUNING = {"k_anchors": 4, "top_m": 12}
# The shipped ViTs and their held-out canvases as `eval` and `sweep` name them (the values are
# tokenprune.proxy's REGIMES; tokenprune/cli/shipped.py makes them CLIP_benchmark's).
SHIPPED_PREFIX = "tokenprune:"
SHIPPED_MODELS = {"tokenprune:proxy-vit": "small", "tokenprune:proxy-vit-large": "large"}
SHIPPED_DATASETS = {"tokenprune:digits": "small", "tokenprune:digits-large": "large"}
SHIPPED_PRETRAINED = "shipped"  # the --pretrained a shipped model runs with: its own weights
DEMO_MODEL = "tokenprune:proxy-vit"  # what `tokenprune visualize` runs without --model


class CLIError(Exception):
    """Bad input: main() prints the message on one line and exits with status 1. Raise it
    `from` the original error: TOKENPRUNE_DEBUG=1 prints that error's traceback."""


def note(message):
    """One line for the user on stderr, prefixed like every tokenprune message."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ----- flags -------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse, but an argument error is one line instead of a screenful of usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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


def add_pruning_arguments(parser, always_on=False, schedule=True):
    """The pruning flags (PruneConfig's fields), --enable_pruning unless `always_on`, and
    --schedule if `schedule`."""
    group = parser.add_argument_group(
        "token pruning (tokenprune)",
        "Keep CLS + k_anchors + top_m tokens at one block of the image tower.")
    if not always_on:
        group.add_argument("--enable_pruning", action="store_true", default=False,
                           help="prune visual tokens (default: off, plain CLIP_benchmark)")
    d = PRUNING_DEFAULTS
    group.add_argument("--k_anchors", type=int, default=d["k_anchors"],
                       help="anchor tokens chosen by the CLS attention (>= 1, default %(default)s)")
    group.add_argument("--top_m", type=int, default=d["top_m"],
                       help="further tokens kept by score (>= 0, default %(default)s)")
    group.add_argument("--alpha", type=float, default=d["alpha"],
                       help="importance weight against diversity, in [0, 1] (default %(default)s)")
    group.add_argument("--score_norm", choices=SCORE_NORMS, default=d["score_norm"],
                       help="'none' (the seed's formula, default) or 'minmax' (rescale "
                            "importance and diversity to [0, 1] before mixing)")
    group.add_argument("--layer", type=int, default=d["layer"],
                       help="index of the pruned block, counting from 0; negative from the end "
                            "(default -1, the last block)")
    group.add_argument("--backend", choices=BACKENDS, default=d["backend"],
                       help="'auto' (Triton on CUDA, else PyTorch; default), 'triton' or "
                            "'reference'")
    group.add_argument("--selection", choices=SELECTIONS, default=d["selection"],
                       help="which patches are kept (docs/selections.md): 'score' (the seed's "
                            "anchors + importance/diversity score; default), 'cls' (the k + m "
                            "the CLS token attends to most), 'mmr' (anchors, then maximal "
                            "marginal relevance against every kept patch) or 'random'")
    group.add_argument("--mmr_lambda", type=float, default=d["mmr_lambda"],
                       help="--selection mmr: weight of CLS attention against similarity to "
                            "the kept patches, in [0, 1] (default %(default)s)")
    if schedule:
        group.add_argument("--schedule", type=parse_schedule, default=d["schedule"],
                           metavar="LAYER:K:M,...",
                           help="prune at several blocks instead of one: stages "
                                "LAYER:K_ANCHORS:TOP_M separated by commas, blocks increasing, "
                                "each stage keeping fewer patches than the one before and "
                                "selecting among them (e.g. 3:4:20,6:2:10); replaces --layer, "
                                "--k_anchors and --top_m")
    return group


def add_sweep_arguments(parser):
    """`tokenprune sweep`'s own flags (the grid's lists, the controls, where the results go),
    next to eval's flags."""
    group = parser.add_argument_group("sweep (tokenprune)")
    for name, (kind, allowed) in LIST_FLAGS.items():
        group.add_argument(f"--{name}", type=kind, nargs="*", default=LIST_DEFAULTS[name],
                           help=f"{allowed} (default: {' '.join(map(str, LIST_DEFAULTS[name]))})")
    group.add_argument("--schedule", type=parse_schedule, nargs="*", default=[],
                       metavar="LAYER:K:M,...",
                       help="schedules to grid over instead of --layer x --k_anchors x --top_m: "
                            "each value one schedule, stages LAYER:K_ANCHORS:TOP_M separated by "
                            "commas, as eval's --schedule (e.g. 3:10:90,6:10:50 6:10:50; one "
                            "stage is a single cut); summary.md says which wins at each budget")
    group.add_argument("--controls", nargs="*", default=list(CONTROLS),
                       help="controls at each grid point's token count: 'random' (k + m "
                            "patches at random, seeded by --seed) and 'cls' (the k + m patches "
                            "the CLS token attends to most); 'none' for neither "
                            "(default: random cls)")
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="selection backend (default %(default)s)")
    group.add_argument("--output_dir", required=True,
                       help=f"folder for {', '.join(SWEEP_OUTPUT_FILES)}; made if missing")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the results of an earlier sweep in --output_dir (without "
                            "it, such a folder is refused)")
    group.add_argument("--no_speed", action="store_true",
                       help="do not time encode_image (by default each setting's images/s are "
                            "timed on the sweep's own passes over the data: no extra pass)")


def sweep_lists(args):
    """The sweep's lists, each value checked as PruneConfig checks it, duplicates dropped:
    {flag: values, "controls": [...]}; a CLIError names the first bad flag."""
    lists = {}
    for name, (_, allowed) in LIST_FLAGS.items():
        values = getattr(args, name)
        if not values:
            raise CLIError(f"--{name}: give at least one value ({allowed})")
        for value in values:
            try:
                PruneConfig(**{name: value})
            except ValueError as err:
                raise CLIError(f"--{err}") from None
        lists[name] = list(dict.fromkeys(values))
    schedules = list(dict.fromkeys(getattr(args, "schedule", None) or []))
    if schedules:
        given = [f"--{name} {' '.join(map(str, lists[name]))}" for name in SCHEDULE_REPLACES
                 if lists[name] != LIST_DEFAULTS[name]]
        if given:
            raise CLIError(f"--schedule gives every point's blocks and counts: leave out "
                           f"{', '.join(given)}")
        for schedule in schedules:
            try:
                PruneConfig(schedule=schedule)
            except ValueError as err:
                raise CLIError(f"--{err}") from None
    lists["schedule"] = schedules
    controls = args.controls
    if not controls or any(c not in CONTROLS + ("none",) for c in controls) or (
            "none" in controls and len(controls) > 1):
        raise CLIError(f"--controls {' '.join(controls) or '(empty)'}: give random and/or cls, "
                    "or none")
    lists["controls"] = [] if controls == ["none"] else controls
    return lists


def add_tokenizer_argument(parser):
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="folder holding the model's text tokenizer, saved with "
                             "transformers' save_pretrained: for models whose tokenizer "
                             "OpenCLIP loads from the Hugging Face hub (SigLIP, SigLIP2, ...), "
                             "where the hub cannot be reached")


def add_verbose_argument(parser):
    parser.add_argument("--verbose", dest="show_warnings", action="store_true", default=False,
                        help="also show the third-party warnings that tokenprune hides as "
                             "known to be harmless here")


def use_shipped_model(args):
    """`tokenprune visualize`: True when it runs a ViT shipped with the package: the small one
    with no --model, --image or --pretrained, or the one --model names (SHIPPED_MODELS), which
    takes neither --image nor --pretrained. Fills in --model and the unset k, m and selection
    for the model that runs, and `compare_selections`: whether the picture shows the three
    selections side by side (a shipped model with no --selection and no --schedule); calling
    it again changes nothing."""
    if args.model is not None and args.model.startswith(SHIPPED_PREFIX):
        if args.model not in SHIPPED_MODELS:
            close = difflib.get_close_matches(args.model, SHIPPED_MODELS, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise CLIError(f"unknown model {args.model!r}: the shipped models are "
                           f"{' and '.join(SHIPPED_MODELS)}.{hint}")
        if args.image is not None:
            raise CLIError(f"--image {args.image}: {args.model} reads its own held-out digit "
                           "canvases only; leave --image out, or give an OpenCLIP --model")
        if args.pretrained is not None:
            raise CLIError(f"--pretrained {args.pretrained}: {args.model} brings its own trained "
                           "weights (in tokenprune/assets/); leave --pretrained out")
    shipped = args.model in SHIPPED_MODELS or (
        args.model is None and args.image is None and args.pretrained is None)
    schedule = bool(getattr(args, "schedule", None))  # its stages give k and m: one selection
    if not hasattr(args, "compare_selections"):
        args.compare_selections = shipped and args.selection is None and not schedule
    if args.selection is None:
        args.selection = PRUNING_DEFAULTS["selection"]
    for name, value in SHIPPED_MODEL_PRUNING.items():
        if getattr(args, name) is None:
            setattr(args, name, value if shipped and not schedule else PRUNING_DEFAULTS[name])
    if args.model is None and not shipped:
        args.model = "ViT-B-16"
    return shipped


def check_visualize_model(args):
    """visualize's --model, --pretrained, --layer and --schedule, from the flags and the model's
    config, before anything is imported (after use_shipped_model)."""
    if args.model is None or args.model in SHIPPED_MODELS:
        depth = check_model_config(args.model or DEMO_MODEL)
    else:
        check_pretrained_files([args.pretrained] if args.pretrained else [])
        depth = check_model_config(args.model, pruning_flag="")
        if args.pretrained and os.path.isdir(args.pretrained):  # a tag, or meant as a file?
            check_model(args.model, args.pretrained)
    check_blocks(args, depth)


def prune_config(args):
    """The PruneConfig of the parsed flags; a bad value is a CLIError naming the flag."""
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


# ----- checks made before anything is loaded ------------------------------------------------

def check_run_flags(args):
    """eval's and sweep's flags that need nothing loaded: the batch size and the number of
    workers (CLIP_benchmark's DataLoader would fail on them only after the model loaded)."""
    if args.batch_size < 1:
        raise CLIError(f"--batch_size must be an integer >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise CLIError(f"--num_workers must be an integer >= 0, got {args.num_workers}")


def _can_write_in(folder):
    """Whether a file can be made in `folder`: tried, since os.access says yes to root even on
    a read-only filesystem."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".tokenprune-probe-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.remove(probe)
    return True


def _check_writable(flag, given, folder, create=False):
    """`folder` (or, with `create`, the nearest folder above it that exists) is a folder that
    can be written in; else a CLIError naming `flag` and the value `given`."""
    existing = os.path.abspath(folder)
    if not create and not os.path.exists(existing):
        raise CLIError(f"{flag} {given}: the folder {folder} does not exist; make it first")
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CLIError(f"{flag} {given}: {existing} is a file, not a folder")
    if not _can_write_in(existing):
        raise CLIError(f"{flag} {given}: cannot write in {existing} (no permission, or a "
                       "read-only filesystem)")


def _as_list(value):
    return value if isinstance(value, list) else [value]


def eval_output_files(args):
    """The results files `tokenprune eval` will write: CLIP_benchmark's --output template
    filled in for each model, dataset and language ({task} stays as written)."""
    template = args.output
    models = [(m, p) for m, p in product(_as_list(args.model), _as_list(args.pretrained))]
    files = []
    for (model, pretrained), dataset, language in product(models, _as_list(args.dataset),
                                                          _as_list(args.language)):
        name = dataset.replace("wds/", "", 1) if dataset.startswith("wds/") else dataset
        weights = os.path.basename(pretrained) if os.path.isfile(pretrained) else pretrained
        full = pretrained.replace("/", "_") if os.path.isfile(pretrained) else pretrained
        try:
            files.append(template.format(model=model, pretrained=weights, language=language,
                                         pretrained_full_path=full, task="{task}",
                                         dataset=name.replace("/", "_")))
        except (KeyError, IndexError, ValueError) as err:
            raise CLIError(f"--output {template}: not a file name template ({err!r}); the "
                           "fields are {dataset}, {model}, {pretrained}, "
                           "{pretrained_full_path}, {language} and {task}") from err
    return files


def check_eval_output(args):
    """`tokenprune eval --output`: each results file is a file (not a folder) in a folder that
    exists and can be written (CLIP_benchmark opens it only after the whole run)."""
    for path in eval_output_files(args):
        if "{task}" in os.path.dirname(path):
            continue  # a folder per task: known only once CLIP_benchmark resolves --task auto
        if os.path.isdir(path):
            raise CLIError(f"--output {args.output}: {path} is a folder; give a file name, "
                           f"e.g. --output {os.path.join(path, 'results.json')}")
        _check_writable("--output", args.output, os.path.dirname(path) or ".")


def check_sweep_output(args):
    """`tokenprune sweep --output_dir`: a folder (or a path where one can be made) that can be
    written, and that holds no earlier results unless --overwrite."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--output_dir {out}: a file, not a folder")
    found = [name for name in SWEEP_OUTPUT_FILES if os.path.exists(os.path.join(out, name))]
    if found and not args.overwrite:
        raise CLIError(f"--output_dir {out}: already holds sweep results ({', '.join(found)}); "
                       "add --overwrite to replace them, or give another folder")
    _check_writable("--output_dir", out, out, create=True)


def webdataset_workers(args):
    """eval's and sweep's checks of a local WebDataset (`--dataset wds/NAME`), made before the
    model loads: its class names must be there for zero-shot classification, and no more
    workers are used than it has shards (a worker without a shard fails in webdataset).
    Returns the --num_workers to use; a note says when that is fewer than asked."""
    workers = args.num_workers
    for dataset in _as_list(args.dataset):
        if not dataset.startswith("wds/") or "://" in args.dataset_root:
            continue
        name = dataset.replace("wds/", "", 1)
        root = args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
        shards = _webdataset_shards(dataset, root, args)
        try:
            with open(os.path.join(root, "dataset_type.txt"), encoding="utf-8") as f:
                kind = f.read().strip().lower()
        except OSError:
            kind = "classification"
        if (kind != "retrieval" and args.task in ("auto", "zeroshot_classification")
                and not args.custom_classname_file
                and not os.path.isfile(os.path.join(root, "classnames.txt"))):
            raise CLIError(f"--dataset {dataset}: no classnames.txt in {root} (one class name a "
                           "line, in label order), which zero-shot classification needs; add "
                           "it, or pass --custom_classname_file")
        if 0 < shards < workers:
            note(f"note: --num_workers {args.num_workers}: {dataset} has {shards} "
                 f"shard{'s' if shards > 1 else ''}, so {shards} worker{'s' if shards > 1 else ''} "
                 f"read{'' if shards > 1 else 's'} it (a worker needs a shard of its own)")
            workers = shards
    return workers


def _webdataset_shards(dataset, root, args):
    """The shard count in a local WebDataset's SPLIT/nshards.txt, which CLIP_benchmark reads
    first; a CLIError, naming --dataset_root (or its absence), where there is none."""
    where = (f"--dataset_root {args.dataset_root}" if args.dataset_root != DEFAULT_DATASET_ROOT
             else f"no --dataset_root given, so CLIP_benchmark's default, the folder "
                  f"{DEFAULT_DATASET_ROOT!r} here")
    found = os.path.join(root, args.split, "nshards.txt")
    try:
        with open(found, encoding="utf-8") as f:
            return int(f.read())
    except OSError:
        missing = (f"no folder {os.path.abspath(root)}" if not os.path.isdir(root) else
                   f"no {os.path.join(args.split, 'nshards.txt')} in {root}")
    except ValueError:
        missing = f"{found} does not hold a number of shards"
    raise CLIError(f"--dataset {dataset}: {missing} ({where}); give --dataset_root DIR, the "
                   f"WebDataset's folder, which holds {args.split}/nshards.txt, the shards "
                   f"{args.split}/0.tar ... and classnames.txt")


# ----- dataset names and the shipped models, checked before anything is loaded -------------

class KnownDatasets(NamedTuple):
    """The dataset names CLIP_benchmark's build_dataset accepts (names, and prefixes such as
    wds/ that take any name after them), those of its vtab/ branch, and its collections."""
    names: frozenset
    prefixes: tuple
    vtab_names: frozenset
    vtab_prefixes: tuple
    collections: frozenset


def _strings(node):
    """The string constants of an AST node: a constant, or a tuple, list or set of them."""
    import ast
    elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def _compared_names(function, variable="dataset_name"):
    """(names, prefixes): the strings that `variable` is compared with (== or in) and the
    prefixes it is tested for (.startswith) in a parsed function."""
    import ast
    names, prefixes = set(), set()
    for node in ast.walk(function):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                and node.left.id == variable
                and all(isinstance(op, (ast.Eq, ast.In)) for op in node.ops)):
            for comparator in node.comparators:
                names |= _strings(comparator)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "startswith" and isinstance(node.func.value, ast.Name)
              and node.func.value.id == variable):
            for arg in node.args:
                prefixes |= _strings(arg)
    return names, prefixes


@functools.lru_cache(maxsize=None)
def clip_benchmark_datasets():
    """The KnownDatasets of the installed clip-benchmark, read from the source of
    clip_benchmark/datasets/builder.py (the names its build_dataset and build_vtab_dataset
    compare `dataset_name` with, and its `dataset_collection`): CLIP_benchmark keeps no list of
    them, and importing that module takes seconds (torchvision's model zoo). None when the
    source cannot be read as expected; then no name is refused before loading."""
    import ast
    from importlib.util import find_spec
    try:  # the package's folder, found without importing it
        folder = os.path.dirname(find_spec("clip_benchmark").origin)
        with open(os.path.join(folder, "datasets", "builder.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (ImportError, AttributeError, TypeError, ValueError, OSError, SyntaxError):
        return None
    functions, collections = {}, None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id == "dataset_collection"):
            try:
                collections = ast.literal_eval(node.value)
            except ValueError:
                return None
    if "build_dataset" not in functions or "build_vtab_dataset" not in functions or \
            not isinstance(collections, dict):
        return None
    names, prefixes = _compared_names(functions["build_dataset"])
    vtab_names, vtab_prefixes = _compared_names(functions["build_vtab_dataset"])
    if "cifar10" not in names or "wds/" not in prefixes:  # not the builder we know how to read
        return None
    return KnownDatasets(frozenset(names), tuple(sorted(prefixes)), frozenset(vtab_names),
                         tuple(sorted(vtab_prefixes)), frozenset(collections))


def _dataset_known(name, known):
    if name in known.names or name in known.collections or name in SHIPPED_DATASETS:
        return True
    if name.startswith("vtab/"):
        tail = name[len("vtab/"):]
        return tail in known.vtab_names or tail.startswith(known.vtab_prefixes)
    return name.startswith(known.prefixes)


def check_datasets(args):
    """eval's and sweep's --dataset, before the model loads: every name is one CLIP_benchmark
    or tokenprune knows (else the closest ones are offered), a collection, or a file listing
    datasets; a local WebDataset's folder is checked by webdataset_workers."""
    known = clip_benchmark_datasets()
    for name in _as_list(args.dataset):
        if known is None or os.path.isfile(name) or _dataset_known(name, known):
            continue
        choices = sorted(known.names | known.collections | set(SHIPPED_DATASETS) |
                         {f"vtab/{vtab}" for vtab in known.vtab_names})
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise CLIError(f"unknown dataset {name!r}: not a CLIP_benchmark or tokenprune dataset."
                       f"{hint} Use a CLIP_benchmark dataset (cifar10, imagenet1k, vtab/..., a "
                       f"collection such as vtab), a shipped one ({', '.join(SHIPPED_DATASETS)}: "
                       "offline) or a local WebDataset: --dataset wds/NAME --dataset_root DIR")


def flag_given(argv, flag):
    """Whether a command line sets `flag` itself (spelt in full: argparse takes no shorter
    spelling where another flag shares it, as --pretrained_model does --pretrained's)."""
    return any(arg.partition("=")[0] == flag for arg in argv)


def pretrained_given(argv):
    """Whether a command line sets --pretrained itself (its default is CLIP_benchmark's
    laion400m_e32)."""
    return flag_given(argv, "--pretrained")


def usable_cpus():
    """The CPUs this process may run on, as torch's DataLoader counts them when it warns about
    too many workers (the affinity mask where there is one, else os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(args, argv):
    """eval's and sweep's --num_workers: as given, else CLIP_benchmark's default (4) but no more
    than the CPUs here; more would make torch's DataLoader warn (twice a run) and gain nothing."""
    if flag_given(argv, "--num_workers"):
        return args.num_workers
    return min(args.num_workers, usable_cpus())


def _shipped_name(names, regime):
    """The shipped model or dataset (in `names`) of a regime."""
    return next(name for name, its_regime in names.items() if its_regime == regime)


def check_shipped(args, argv):
    """eval's and sweep's use of the shipped models and datasets (tokenprune:...), before
    anything loads: a shipped model runs on the canvases of its own regime only, with its own
    weights, and they on it only. For shipped models, sets --pretrained to SHIPPED_PRETRAINED and
    returns True."""
    models, datasets = _as_list(args.model), _as_list(args.dataset)
    shipped = [model for model in models if model.startswith(SHIPPED_PREFIX)]
    for model in shipped:
        if model not in SHIPPED_MODELS:
            close = difflib.get_close_matches(model, SHIPPED_MODELS, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise CLIError(f"unknown model {model!r}: the shipped models are "
                           f"{' and '.join(SHIPPED_MODELS)}.{hint}")
    digits = [dataset for dataset in datasets if dataset in SHIPPED_DATASETS]
    if not shipped:
        if digits:
            raise CLIError(f"--dataset {digits[0]}: the shipped digit canvases are read by the "
                           f"shipped models only; use --model {' or '.join(SHIPPED_MODELS)}")
        return False
    if len(shipped) < len(models):
        raise CLIError(f"--model {' '.join(models)}: give the shipped models ({', '.join(shipped)}) "
                       "in a run of their own: they take no --pretrained, the others do")
    if pretrained_given(argv):
        raise CLIError(f"--pretrained {' '.join(_as_list(args.pretrained))}: {shipped[0]} brings "
                       "its own trained weights (in tokenprune/assets/); leave --pretrained out")
    others = [dataset for dataset in datasets if dataset not in SHIPPED_DATASETS]
    if others:
        raise CLIError(f"--dataset {others[0]}: the shipped models read only their digit "
                       f"canvases; use --dataset {' or '.join(SHIPPED_DATASETS)}")
    # Each shipped model reads the canvases of its own regime: the other regime's digits are a
    # task it was never trained on (4% acc1 for the small model on the large digits).
    for model, dataset in product(shipped, datasets):
        if SHIPPED_MODELS[model] != SHIPPED_DATASETS[dataset]:
            own = _shipped_name(SHIPPED_DATASETS, SHIPPED_MODELS[model])
            reader = _shipped_name(SHIPPED_MODELS, SHIPPED_DATASETS[dataset])
            raise CLIError(f"--dataset {dataset}: {model} was trained on the "
                           f"{SHIPPED_MODELS[model]}-digit canvases, {own}; {dataset} holds the "
                           f"{SHIPPED_DATASETS[dataset]}-digit ones, which {reader} reads. Use "
                           f"--dataset {own}, or --model {reader}")
    if args.task not in ("auto", "zeroshot_classification"):
        raise CLIError(f"--task {args.task}: the shipped models and canvases run zero-shot "
                       "classification only (--task auto or zeroshot_classification)")
    if args.split != "test":
        raise CLIError(f"--split {args.split}: the shipped canvases have a test split only (the "
                       "held-out canvases its card's accuracy was measured on)")
    args.pretrained = [SHIPPED_PRETRAINED] if isinstance(args.pretrained, list) \
        else SHIPPED_PRETRAINED
    return True


# ----- a model's image tower, read from its config alone (no weights, no torch) --------------

# The JSON card beside each shipped checkpoint, by regime (tokenprune.proxy.REGIMES names the
# same files, but importing tokenprune.proxy imports torch); its "arch" is the tower's shape.
SHIPPED_CARDS = {"small": "proxy_vit.json", "large": "proxy_vit_large.json"}
# What --pretrained takes besides a tag: a checkpoint file. A tag never has a path separator or
# one of these endings, so a value with either names a file.
CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def shipped_card(model_name):
    """The card of a shipped model (SHIPPED_MODELS), read without importing torch."""
    from importlib import resources
    card = resources.files("tokenprune").joinpath("assets",
                                                   SHIPPED_CARDS[SHIPPED_MODELS[model_name]])
    return json.loads(card.read_text(encoding="utf-8"))


def _openclip_config_folder():
    """open_clip's model_configs folder, found without importing open_clip (10 s or more)."""
    from importlib.util import find_spec
    try:
        return os.path.join(os.path.dirname(find_spec("open_clip").origin), "model_configs")
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def known_openclip_models():
    """The OpenCLIP architecture names: open_clip.list_models() once open_clip is imported (it
    also knows the configs added at run time with add_model_config), else its config files."""
    if "open_clip" in sys.modules:
        import open_clip
        return list(open_clip.list_models())
    folder = _openclip_config_folder()
    try:
        return sorted(name[:-len(".json")] for name in os.listdir(folder)
                      if name.endswith(".json"))
    except (OSError, TypeError):
        return []


def openclip_config(model_name):
    """The config of an OpenCLIP --model without a schema, as open_clip.get_model_config gives
    it, read from its file when open_clip is not imported yet; None for a name OpenCLIP does
    not know."""
    name = model_name.replace("/", "-")
    if "open_clip" in sys.modules:
        import open_clip
        return open_clip.get_model_config(name)
    folder = _openclip_config_folder()
    if folder is None or name not in known_openclip_models():
        return None
    try:
        with open(os.path.join(folder, f"{name}.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def unknown_model_message(model_name):
    close = difflib.get_close_matches(model_name.replace("/", "-"), known_openclip_models(), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (f"unknown model {model_name!r}: not an OpenCLIP architecture.{hint} List them with "
            "`python -c \"import open_clip; print(open_clip.list_models())\"`, or use "
            "--model local-dir:/path/to/folder")


def check_model_config(model_name, pruning_flag=None):
    """What --model's config says, before anything is imported or loaded: an unknown name, a
    local-dir: folder without its config and (when `pruning_flag` names the flag that asked for
    pruning, or is "" when pruning is implied) a ResNet tower are CLIErrors. Returns the image
    tower's number of blocks where the config gives it (a shipped model, an OpenCLIP ViT), else
    None (hf-hub:, a timm tower: known once built). check_model checks the rest once open_clip
    is imported (pretrained tags, timm towers)."""
    if model_name in SHIPPED_MODELS:
        return shipped_card(model_name)["arch"]["layers"]
    if model_name.startswith("hf-hub:"):
        return None
    if model_name.startswith("local-dir:"):
        folder = model_name[len("local-dir:"):]
        try:
            with open(os.path.join(folder, "open_clip_config.json"), encoding="utf-8") as f:
                config = json.load(f).get("model_cfg") or {}
        except OSError:
            raise CLIError(f"--model {model_name}: no open_clip_config.json in {folder!r}") \
                from None
        except (ValueError, AttributeError):
            return None  # OpenCLIP says what is wrong with it
    else:
        config = openclip_config(model_name)
        if config is None:
            raise CLIError(unknown_model_message(model_name))
    vision = config.get("vision_cfg") or {}
    layers = vision.get("layers")
    if pruning_flag is not None and isinstance(layers, (list, tuple)):
        raise CLIError(f"{pruning_flag or '--model ' + model_name}: {model_name} has a ResNet "
                       "image tower, which cannot be pruned; tokenprune prunes the Vision "
                       "Transformer towers of docs/towers.md")
    if vision.get("timm_model_name") or isinstance(layers, bool) or not isinstance(layers, int):
        return None
    return layers


def blocks_problem(schedule, layer, depth):
    """Why --schedule (its stages as given: a one-stage schedule too, which PruneConfig makes a
    single cut) or --layer does not fit a `depth`-block tower, worded as PruneConfig's
    block_indices words it; None when it fits."""
    if schedule:
        for number, stage in enumerate(schedule, 1):
            if not -depth <= stage[0] < depth:
                return (f"schedule stage {number} layer must be in [{-depth}, {depth - 1}] for "
                        f"this {depth}-block tower, got {stage[0]}")
        try:
            PruneConfig(schedule=schedule).block_indices(depth)
        except ValueError as err:  # stages whose signs differ, out of order in this tower
            return str(err)
        return None
    if not -depth <= layer < depth:
        return f"layer must be in [{-depth}, {depth - 1}] for this {depth}-block tower, got {layer}"
    return None


def check_blocks(args, depth):
    """eval's and visualize's --layer or --schedule against a `depth`-block tower (None: not
    known yet, nothing checked); a CLIError names the flag, the stage and the range."""
    problem = None if depth is None else blocks_problem(getattr(args, "schedule", None),
                                                         args.layer, depth)
    if problem:
        raise CLIError(f"--{problem}")


def schedule_text(stages):
    """A schedule as --schedule writes it: 3:10:90,6:10:50."""
    return ",".join(":".join(map(str, stage)) for stage in stages)


def check_sweep_blocks(lists, depth, model):
    """sweep's --layer values and --schedule values exist in the `depth`-block tower, in order."""
    for layer in lists["layer"]:
        if not -depth <= layer < depth:
            raise CLIError(f"--layer must be in [{-depth}, {depth - 1}] for {model}'s "
                           f"{depth}-block image tower, got {layer}")
    for schedule in lists["schedule"]:
        problem = blocks_problem(schedule, None, depth)
        if problem:
            raise CLIError(f"--schedule {schedule_text(schedule)}: {problem}")


def _looks_like_a_file(pretrained):
    return (os.sep in pretrained or "/" in pretrained or pretrained.startswith("~")
            or pretrained.lower().endswith(CHECKPOINT_EXTENSIONS))


def check_pretrained_files(values):
    """--pretrained values that name a file (a path separator, ~, or a checkpoint's ending): the
    file is there and is a file; before anything is imported, and before the results file's
    name is made from it. A plain name may be a tag: check_model judges it."""
    for pretrained in values:
        if not pretrained or not _looks_like_a_file(pretrained):
            continue
        path = os.path.expanduser(pretrained)
        if os.path.isdir(path):
            raise CLIError(folder_not_checkpoint_message(pretrained))
        if not os.path.isfile(path):
            raise CLIError(f"--pretrained {pretrained}: no such checkpoint file (give a file "
                           "that exists, or a pretrained tag of the model, such as openai)")


def folder_not_checkpoint_message(pretrained):
    return (f"--pretrained {pretrained}: a folder, not a checkpoint file; give the weights file "
            f"in it (e.g. --pretrained {os.path.join(pretrained, 'open_clip_pytorch_model.bin')}"
            f"), or, for a folder that holds open_clip_config.json and the weights, --model "
            f"local-dir:{pretrained}")


def check_models_before_loading(args, pruning_flag=None):
    """eval's --model and --pretrained lists, before anything is imported: checkpoint files
    that are missing or folders, unknown OpenCLIP names, ResNet towers (when `pruning_flag`),
    and --layer or --schedule outside a tower whose depth the config gives."""
    if args.pretrained_model:
        return  # the models come from that list instead
    if args.model_type != "open_clip":
        return
    check_pretrained_files(_as_list(args.pretrained))
    for model in _as_list(args.model):
        depth = check_model_config(model, pruning_flag)
        if pruning_flag is not None:
            check_blocks(args, depth)
    check_pretrained_folders(args)


def check_pretrained_folders(args):
    """A --pretrained that is a folder named like a word (no path separator): a pretrained tag
    wins over a folder in OpenCLIP, and only OpenCLIP's tags tell which it is, so open_clip is
    imported for it here, before CLIP_benchmark starts its run and prints its plan."""
    if any(os.path.isdir(pretrained) for pretrained in _as_list(args.pretrained)):
        for model, pretrained in product(_as_list(args.model), _as_list(args.pretrained)):
            if model not in SHIPPED_MODELS:
                check_model(model, pretrained)



def one_value(args, name):
    """The one value sweep takes for `name` (model, pretrained, dataset, language)."""
    values = _as_list(getattr(args, name))
    if len(values) != 1:
        raise CLIError(f"--{name} {' '.join(map(str, values))}: tokenprune sweep takes exactly "
                       f"one {name} per run")
    return values[0]


def check_sweep_before_loading(args, lists):
    """sweep's flags that need nothing imported (docs/commands.md promises them before any model
    loads): one model, weights file, dataset and language; no collection of datasets; a known
    model whose tower can be pruned, with every --layer and --schedule inside it where its
    config gives its depth."""
    for flag in ("distributed", "skip_load"):
        if getattr(args, flag):
            raise CLIError(f"--{flag}: not supported by tokenprune sweep")
    if args.pretrained_model:
        raise CLIError("--pretrained_model: tokenprune sweep takes one --model and one "
                       "--pretrained")
    model = one_value(args, "model")
    one_value(args, "pretrained")
    dataset = one_value(args, "dataset")
    one_value(args, "language")
    known = clip_benchmark_datasets()
    if os.path.isfile(dataset) or (known is not None and dataset in known.collections):
        raise CLIError(f"--dataset {dataset}: a collection of datasets; tokenprune sweep takes "
                       "one dataset per run")
    if model not in SHIPPED_MODELS and args.model_type != "open_clip":
        raise CLIError(f"--model_type {args.model_type}: tokenprune sweep prunes OpenCLIP "
                       "models only")
    check_pretrained_files(_as_list(args.pretrained))
    depth = check_model_config(model, pruning_flag="")
    if depth is not None:
        check_sweep_blocks(lists, depth, model)
    check_pretrained_folders(args)


def check_image_output(flag, path):
    """`tokenprune visualize --out`: a file name with an image extension that Pillow writes,
    not a folder, in a folder that exists or can be made and that can be written."""
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path}: a folder; give a file name, e.g. "
                       f"{flag} {os.path.join(path, 'kept.png')}")
    from PIL import Image
    Image.init()
    extension = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise CLIError(f"{flag} {path}: not an image file name Pillow can write (give one "
                       "ending in .png, e.g. kept.png)")
    _check_writable(flag, path, os.path.dirname(path) or ".", create=True)


def check_device(device):
    """The torch device to use: `device`, or cuda when available, else cpu. A device that this
    machine does not have is a CLIError, before any model is loaded."""
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {device}: not a torch device (use cpu, cuda or cuda:N)") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: no CUDA device is available on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                           f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def cpu_has_native_bfloat16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, ARM BF16),
    where CLIP_benchmark's default bfloat16 autocast is fast; without it, autocast on the CPU
    is often several times slower than float32. From the CPU's flags in `cpuinfo` (Linux);
    None when they cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pretrained_hint(model_name):
    """How to give `model_name` trained weights: its own OpenCLIP pretrained tags, or a file."""
    from open_clip.pretrained import list_pretrained_tags_by_model
    tags = list_pretrained_tags_by_model(model_name.replace("/", "-"))
    if not tags:
        return "--pretrained /path/to/checkpoint.bin"
    tag = "openai" if "openai" in tags else tags[0]
    others = f"; its tags: {', '.join(tags)}" if len(tags) > 1 else ""
    return f"--pretrained {tag} (downloads once{others}) or --pretrained /path/to/checkpoint.bin"


def hub_tokenizer(model_name):
    """The Hugging Face hub id OpenCLIP loads `model_name`'s text tokenizer from (its config's
    text_cfg.hf_tokenizer_name), or None: OpenCLIP's own tokenizer, or a model folder or hub
    repository that brings its tokenizer along."""
    import open_clip
    from open_clip.factory import parse_model_name
    schema, _ = parse_model_name(model_name)
    if schema is not None:
        return None
    config = open_clip.get_model_config(model_name.replace("/", "-")) or {}
    return config.get("text_cfg", {}).get("hf_tokenizer_name") or None


def tokenizer_cached(hub_id):
    """Whether the Hugging Face cache (HF_HOME) holds the tokenizer `hub_id`."""
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(hub_id, "tokenizer_config.json"), str)


def missing_tokenizer_message(model_name, hub_id, cause=None):
    why = f" ({cause})" if cause else ""
    return (f"the text tokenizer of {model_name} is missing: OpenCLIP loads it from the Hugging "
            f"Face hub as {hub_id}{why}, which cannot be reached from here (HF_HUB_OFFLINE=1 or "
            "no network), and the Hugging Face cache does not hold it. Where downloads work, "
            f"either fill a cache (python -c \"from transformers import AutoTokenizer; "
            f"AutoTokenizer.from_pretrained('{hub_id}')\") and point HF_HOME at a copy of it "
            f"here, or save the tokenizer to a folder (AutoTokenizer.from_pretrained('{hub_id}')"
            ".save_pretrained('DIR')), copy it here and pass --tokenizer DIR")


def check_tokenizer(model_name, tokenizer_dir):
    """Before the model loads: --tokenizer DIR fits the model, or the model's hub tokenizer can
    be had (checked in the cache when the hub is switched off; a failure to reach it otherwise
    is translated by loading_errors)."""
    hub_id = hub_tokenizer(model_name)
    if tokenizer_dir is not None:
        if hub_id is None:
            raise CLIError(f"--tokenizer {tokenizer_dir}: {model_name} does not load its "
                           "tokenizer from the Hugging Face hub (it brings its own); leave "
                           "--tokenizer out")
        if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
            raise CLIError(f"--tokenizer {tokenizer_dir}: no tokenizer_config.json there; give "
                           "a folder written by the tokenizer's save_pretrained (the tokenizer "
                           f"of {model_name} is {hub_id} on the Hugging Face hub)")
        return
    if hub_id is None:
        return
    import huggingface_hub.constants
    if huggingface_hub.constants.HF_HUB_OFFLINE and not tokenizer_cached(hub_id):
        raise CLIError(missing_tokenizer_message(model_name, hub_id))


def check_model(model_name, pretrained, pruning_flag=None):
    """Fail early, before any download, on an unknown architecture or pretrained tag, and (when
    `pruning_flag` names the flag that asked for pruning, or is "" when pruning is implied) on
    a tower that cannot be pruned. Names with a schema (hf-hub:, local-dir:) are left to
    OpenCLIP."""
    import open_clip
    from open_clip.factory import parse_model_name

    try:
        schema, identifier = parse_model_name(model_name)
    except ValueError as err:
        raise CLIError(f"--model {model_name}: {err}") from err
    if schema == "local-dir":
        if not os.path.isfile(os.path.join(identifier, "open_clip_config.json")):
            raise CLIError(f"--model {model_name}: no open_clip_config.json in {identifier!r}")
        return
    if schema is not None:
        return
    name = model_name.replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        raise CLIError(unknown_model_message(model_name))
    if pretrained and not os.path.isfile(pretrained):
        from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
        if not get_pretrained_cfg(name, pretrained):
            if os.path.isdir(pretrained):  # not a tag of this model, so meant as a file
                raise CLIError(folder_not_checkpoint_message(pretrained))
            if os.sep in pretrained or os.path.splitext(pretrained)[1]:
                raise CLIError(f"--pretrained {pretrained}: no such checkpoint file (give a "
                               "file that exists, or a pretrained tag of the model, such as "
                               "openai)")
            tags = ", ".join(list_pretrained_tags_by_model(name)) or "none"
            raise CLIError(f"unknown pretrained tag {pretrained!r} for {model_name} (known tags: "
                           f"{tags}); a local checkpoint file also works: --pretrained PATH")
    if pruning_flag is not None:
        from ..towers import refused_by_config, supported
        tower = refused_by_config(config.get("vision_cfg", {}))
        if tower:
            raise CLIError(f"{pruning_flag or '--model ' + model_name}: {model_name} has {tower}, "
                           f"which cannot be pruned; tokenprune supports OpenCLIP models whose "
                           f"image tower is one of: {supported()}")


# ----- loading failures, classified by the step that failed ---------------------------------

class _StepFailed(Exception):
    """Raised, from the original error, by the OpenCLIP step that failed (see loading_errors).
    OpenCLIP re-raises some errors as its own; the step is found again on the chain."""

    def __init__(self, step, cause, detail=None):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.step = step
        self.detail = detail


def _failed_step(err):
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, _StepFailed):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _step(name, function, diagnose=None):
    """`function`, except that its failure is a _StepFailed(name) raised from the error."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except _StepFailed:
            raise
        except Exception as err:  # noqa: BLE001 - tagged and re-raised, not swallowed
            detail = diagnose(*args, **kwargs) if diagnose else None
            raise _StepFailed(name, err, detail) from err
    return wrapped


def checkpoint_mismatch(model, checkpoint_path, *args, **kwargs):
    """(missing, unexpected, wrong_shape) between `model` and the checkpoint, after OpenCLIP's
    own conversions; wrong_shape holds (key, checkpoint shape, model shape). None when it cannot
    be worked out (then the original error is all there is)."""
    from open_clip import factory
    try:
        state = factory.load_state_dict(checkpoint_path)
        state = factory.convert_state_dict(model, state)
        factory.resize_pos_embed(state, model)
        factory.resize_text_pos_embed(state, model)
    except Exception:  # noqa: BLE001 - a diagnosis of a failure, best effort
        return None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [(key, tuple(state[key].shape), tuple(own[key].shape))
                   for key in own if key in state and hasattr(state[key], "shape")
                   and tuple(state[key].shape) != tuple(own[key].shape)]
    return missing, unexpected, wrong_shape


def _some(keys, count=3):
    shown = ", ".join(keys[:count])
    return shown + (f" and {len(keys) - count} more" if len(keys) > count else "")


def _mismatch_message(model_name, pretrained, mismatch):
    missing, unexpected, wrong_shape = mismatch
    examples = []
    if missing:
        examples.append(f"missing: {_some(missing)}")
    if unexpected:
        examples.append(f"unexpected: {_some(unexpected)}")
    if wrong_shape:
        shapes = [f"{key} is {list(theirs)} in the file, {list(ours)} in the model"
                  for key, theirs, ours in wrong_shape]
        examples.append(f"wrong shape: {_some(shapes, 2)}")
    return (f"--pretrained {pretrained} does not fit --model {model_name}: {len(missing)} "
            f"missing, {len(unexpected)} unexpected and {len(wrong_shape)} wrong-shape weights "
            f"({'; '.join(examples)}). Most likely it is a checkpoint of another architecture: "
            "pass the --model it was trained as")


class _DropLog(logging.Filter):
    """Drops OpenCLIP log records that our own messages repeat."""

    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record):
        return not str(record.msg).startswith(self.prefixes)


@contextmanager
def loading_errors(model_name, pretrained, random_weights_noted=False, tokenizer_dir=None):
    """Turn OpenCLIP's loading failures into one-line CLIErrors that say what failed and what to
    do, classified by the step that failed (download, reading the checkpoint file, loading it
    into the model, loading the text tokenizer), never by the words of an error message.

    OpenCLIP logs a download failure before raising it: our error says it, so that log is
    dropped, as is its random-weights warning when the caller has already printed a note.
    With `tokenizer_dir` (--tokenizer), OpenCLIP's Hugging Face tokenizer is read from there
    instead of the hub."""
    from open_clip import factory

    hf_tokenizer = factory.HFTokenizer

    def make_tokenizer(source, *args, **kwargs):
        return hf_tokenizer(tokenizer_dir or source, *args, **kwargs)

    prefixes = ("Failed to download weights", "Pretrained tag or path")
    log_filter = _DropLog(prefixes + (("No pretrained weights loaded",)
                                      if random_weights_noted else ()))
    steps = {"download_pretrained": _step("download", factory.download_pretrained),
             "download_pretrained_from_hf": _step("download",
                                                  factory.download_pretrained_from_hf),
             "load_state_dict": _step("read", factory.load_state_dict),
             "load_checkpoint": _step("load", factory.load_checkpoint, checkpoint_mismatch),
             "HFTokenizer": _step("tokenizer", make_tokenizer,
                                  lambda source, *args, **kwargs: (source, tokenizer_dir))}
    logging.getLogger().addFilter(log_filter)
    try:
        with swapped([(factory, name, step) for name, step in steps.items()]):
            yield
    except CLIError:
        raise
    except Exception as err:  # noqa: BLE001 - translated, not swallowed
        raise CLIError(loading_error_message(err, model_name, pretrained)) from err
    finally:
        logging.getLogger().removeFilter(log_filter)


def loading_error_message(err, model_name, pretrained):
    """The one-line message for `err`, raised while loading inside `loading_errors`: what
    failed is read from the step that raised it (see _step), not from the message's words."""
    mismatch = torchvision_mismatch_message(err)
    if mismatch:
        return mismatch
    failed = _failed_step(err)
    step = failed.step if failed else None
    cause = failed.__cause__ if failed else err
    what = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
    if step == "download":
        return (f"could not download the pretrained weights {pretrained!r} for {model_name} "
                f"({type(cause).__name__}; {DEBUG_ENV}=1 shows why). Without internet access, "
                "run once where downloads work, or fetch the checkpoint elsewhere and pass the "
                "file: --pretrained /path/to/open_clip_pytorch_model.bin (set HF_HUB_OFFLINE=1 "
                "to skip the download retries)")
    if step == "read":
        return (f"--pretrained {pretrained}: not a readable checkpoint file "
                f"({type(cause).__name__} while reading it). Expected a state_dict saved with "
                "torch.save, a .safetensors file or an OpenCLIP .bin; is the file complete?")
    if step == "tokenizer":
        hub_id, tokenizer_dir = failed.detail
        if tokenizer_dir:
            return (f"--tokenizer {tokenizer_dir}: could not load the tokenizer of {model_name} "
                    f"from it ({what}); give a folder written by save_pretrained of {hub_id}")
        return missing_tokenizer_message(model_name, hub_id, type(cause).__name__)
    if step == "load" and failed.detail and any(failed.detail):
        return _mismatch_message(model_name, pretrained, failed.detail)
    return (f"could not load model {model_name!r} with pretrained {pretrained!r}: {what} "
            f"(set {DEBUG_ENV}=1 for the traceback)")


# ----- torch and torchvision builds that do not match ----------------------------------------

# What `import torchvision` raises (a RuntimeError from torch's operator registry) when its
# compiled operators were built for another torch: open_clip and transformers' image code
# import torchvision, so every command fails there.
MISSING_OPERATOR = re.compile(r"operator torchvision::\w+ does not exist")


def installed_version(name):
    """The installed version of distribution `name`, read from its metadata (importing it is
    what fails); None when it is not installed."""
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torchvision_mismatch_message(err):
    """The one-line message for a torchvision whose build does not match torch, when `err` (or
    an error it was raised from) is the missing-operator error; else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RuntimeError) and MISSING_OPERATOR.search(str(err)):
            break
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    else:
        return None
    torch_version = installed_version("torch") or "(not installed)"
    vision = installed_version("torchvision") or "(not installed)"
    release, _, build = torch_version.partition("+")
    pip = f"torch=={release}"
    # PyTorch's compatibility table: torch 2.x pairs with torchvision 0.(x + 15).
    two = re.match(r"2\.(\d+)\.", release)
    if two:
        pip += f' "torchvision==0.{int(two.group(1)) + 15}.*"'
    else:
        pip += " torchvision (the release made for it)"
    if build:  # a build from PyTorch's own index (+cpu, +cu128, +rocm6.2): the same one
        pip += f" --index-url https://download.pytorch.org/whl/{build}"
    first = (str(err).strip().splitlines() or [""])[0]
    return (f"torch {torch_version} and torchvision {vision} are builds that do not match "
            f"(torchvision's compiled operators do not load: {first}); reinstall the two "
            f"together, from one index: pip install --force-reinstall {pip}")


# ----- third-party warnings known to be harmless here ---------------------------------------

@contextmanager
def quiet_warnings(show=False):
    """Hide the third-party warnings that an ordinary run triggers and that need no action;
    `show` (the --verbose flag) keeps them all."""
    with warnings.catch_warnings():
        if show:
            yield
            return
        # CLIP_benchmark builds its WebDataset without shardshuffle; it reads shards in order.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"webdataset\.",
                                message=r"WebDataset\(shardshuffle=\.\.\.\) is None")
        try:
            from sklearn.exceptions import UndefinedMetricWarning
        except ImportError:
            pass
        else:
            # Precision of a class never predicted, in CLIP_benchmark's classification report.
            warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
        yield
