"""`tokenprune sweep`: a grid of pruning settings, and the cls and random controls at each of
its token budgets, on one model and one dataset in one pass. Its flags: CLIP_benchmark's eval
flags (--help shows those it uses), each pruning flag as a list (flags.add_grid_flags), the
controls and where the results go. They are checked here before anything heavy is imported;
tokenprune/cli/sweep.py runs the grid, sweep_report.py writes what it found.
"""
import os

from ...config import CONTROLS, PruneConfig
from .. import clip_benchmark_flags
from ..checks import (as_list, check_run_flags, check_writable, default_workers, one_value,
                      webdataset_workers)
from ..common import CLIError
from ..dataset_names import check_datasets, clip_benchmark_datasets
from ..flags import (FLAGS, GRID_FLAGS, SCHEDULE_REPLACES, add_grid_flags, add_tokenizer_flag,
                     add_verbose_flag)
from ..model_checks import (check_model_config, check_pretrained_files, check_pretrained_folders,
                            check_sweep_blocks)
from ..shipped_rules import SHIPPED_MODELS, check_shipped
from ..sweep_report import OUTPUT_FILES

NAME = "sweep"
HELP = "evaluate a grid of pruning settings (and controls) in one pass"
DESCRIPTION = ("Zero-shot accuracy of every combination of the pruning lists, plus the random "
               "and cls controls, in one pass over the dataset. Takes CLIP_benchmark's eval "
               "flags (those it uses are listed) and each pruning flag as a list. Writes "
               f"{', '.join(OUTPUT_FILES[:-1])} and {OUTPUT_FILES[-1]}.")
# The grid's default lists: the original description's tuning ranges (k_anchors 5-20, top_m
# 30-100, alpha 0.3-0.7), each holding PruneConfig's default, and PruneConfig's default alone.
GRID = {"k_anchors": [5, 10, 20], "top_m": [30, 50, 100], "alpha": [0.3, 0.5, 0.7],
        **{name: [getattr(PruneConfig, name)]
           for name in ("score_norm", "layer", "selection", "mmr_lambda")}}


def add_arguments(parser):
    clip_benchmark_flags.add_eval_flags(parser, shown=clip_benchmark_flags.SWEEP_FLAGS)
    group = add_grid_flags(parser, GRID)
    group.add_argument("--controls", nargs="*", default=list(CONTROLS),
                       help="controls at each grid point's token count: 'random' (k + m "
                            "patches at random, seeded by --seed) and 'cls' (the k + m patches "
                            "the CLS token attends to most); 'none' for neither "
                            f"(default: {' '.join(CONTROLS)})")
    group.add_argument("--output_dir", required=True,
                       help=f"folder for {', '.join(OUTPUT_FILES)}; made if missing")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the results of an earlier sweep in --output_dir (without "
                            "it, such a folder is refused)")
    group.add_argument("--no_speed", action="store_true",
                       help="do not time encode_image (by default each setting's images/s are "
                            "timed on the sweep's own passes over the data: no extra pass)")
    add_tokenizer_flag(parser)
    add_verbose_flag(parser)


def check(args, argv):
    lists = sweep_lists(args)  # bad values are answered before anything is imported
    check_run_flags(args)
    check_datasets(args)
    check_shipped(args, argv)
    check_sweep_before_loading(args, lists)
    check_sweep_output(args)
    args.num_workers = default_workers(args, argv)
    args.num_workers = webdataset_workers(args)


def run(args, argv):
    from .. import sweep
    sweep.run_sweep(args, sweep_lists(args))


def sweep_lists(args):
    """The sweep's lists, each value checked as PruneConfig checks it, duplicates dropped:
    {flag: values, "schedule": [...], "controls": [...]}; a CLIError names the first bad flag."""
    lists = {}
    for name in GRID_FLAGS:
        values = getattr(args, name)
        if not values:
            raise CLIError(f"--{name}: give at least one value ({FLAGS[f'--{name}'].grid})")
        for value in values:
            try:
                PruneConfig(**{name: value})
            except ValueError as err:
                raise CLIError(f"--{err}") from None
        lists[name] = list(dict.fromkeys(values))
    schedules = list(dict.fromkeys(getattr(args, "schedule", None) or []))
    if schedules:
        given = [f"--{name} {' '.join(map(str, lists[name]))}" for name in SCHEDULE_REPLACES
                 if lists[name] != GRID[name]]
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
    check_pretrained_files(as_list(args.pretrained))
    depth = check_model_config(model, pruning_flag="")
    if depth is not None:
        check_sweep_blocks(lists, depth, model)
    check_pretrained_folders(args)


def check_sweep_output(args):
    """`tokenprune sweep --output_dir`: a folder (or a path where one can be made) that can be
    written, and that holds no earlier results unless --overwrite."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--output_dir {out}: a file, not a folder")
    found = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(out, name))]
    if found and not args.overwrite:
        raise CLIError(f"--output_dir {out}: already holds sweep results ({', '.join(found)}); "
                       "add --overwrite to replace them, or give another folder")
    check_writable("--output_dir", out, out, create=True)
