"""`tokenprune eval`: CLIP_benchmark's zero-shot evaluation, with the pruning applied to the
model it loads. Its flags are CLIP_benchmark's own (the light parser's copy,
clip_benchmark_flags.py) and what tokenprune adds (flags.add_tokenprune_eval_flags). It checks
them before anything heavy is imported, then runs tokenprune/cli/evaluate.py, which parses the
command line again with CLIP_benchmark's own parser, so that every CLIP_benchmark flag works.
"""
import os
from itertools import product

from .. import clip_benchmark_flags
from ..checks import as_list, check_run_flags, check_writable, default_workers, webdataset_workers
from ..common import CLIError
from ..dataset_names import check_datasets
from ..flags import add_tokenprune_eval_flags, prune_config
from ..model_checks import (check_blocks, check_model_config, check_pretrained_files,
                            check_pretrained_folders)
from ..shipped_rules import check_shipped

NAME = "eval"
HELP = ("CLIP_benchmark's zero-shot evaluation, plus the pruning flags (`tokenprune eval --help` "
        "lists them all)")
DESCRIPTION = "CLIP_benchmark's eval plus the pruning flags. Flags take hyphens or underscores."


def add_arguments(parser):
    clip_benchmark_flags.add_eval_flags(parser)
    add_tokenprune_eval_flags(parser)


def leaves_unknown_flags():
    """With a clip-benchmark other than the one the copy of its flags came from, a flag the copy
    does not know may be a new one: CLIP_benchmark's own parser, which eval runs with, judges."""
    return not clip_benchmark_flags.flags_trusted()


def check(args, argv):
    prune_config(args)  # bad values are answered at once
    check_run_flags(args)
    check_datasets(args)
    args.shipped = check_shipped(args, argv)
    # Before the results file's name is made from --pretrained, and before any import.
    check_models_before_loading(args, "--enable_pruning" if args.enable_pruning else None)
    check_eval_output(args)
    args.num_workers = default_workers(args, argv)
    args.num_workers = webdataset_workers(args)


def run(args, argv):
    from .. import evaluate
    eval_args = evaluate.parse_eval_args(argv)
    eval_args.num_workers = args.num_workers  # as check() settled it
    if args.shipped:
        eval_args.pretrained = args.pretrained  # the shipped weights
    evaluate.run_eval(eval_args)


def check_models_before_loading(args, pruning_flag=None):
    """eval's --model and --pretrained lists, before anything is imported: checkpoint files
    that are missing or folders, unknown OpenCLIP names, ResNet towers (when `pruning_flag`),
    and --layer or --schedule outside a tower whose depth the config gives."""
    if args.pretrained_model:
        return  # the models come from that list instead
    if args.model_type != "open_clip":
        return
    check_pretrained_files(as_list(args.pretrained))
    for model in as_list(args.model):
        depth = check_model_config(model, pruning_flag)
        if pruning_flag is not None:
            check_blocks(args, depth)
    check_pretrained_folders(args)


def eval_output_files(args):
    """The results files `tokenprune eval` will write: CLIP_benchmark's --output template
    filled in for each model, dataset and language ({task} stays as written)."""
    template = args.output
    models = [(m, p) for m, p in product(as_list(args.model), as_list(args.pretrained))]
    files = []
    for (model, pretrained), dataset, language in product(models, as_list(args.dataset),
                                                          as_list(args.language)):
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
        check_writable("--output", args.output, os.path.dirname(path) or ".")
