"""CLIP_benchmark's `eval` flags, written down, so that the command line can check a command
(misspelled flags, values of the wrong type) without importing clip_benchmark.cli, which takes
10-35 s on a small CPU machine (it imports torchvision's model zoo).

This copy only checks; the namespace `tokenprune eval` runs with still comes from
CLIP_benchmark's own parser (tokenprune/cli/evaluate.py). tests/test_cli.py checks that the copy
equals the installed clip-benchmark's parser; with another clip-benchmark version the copy is
not trusted to reject flags (see `flags_trusted`).
"""
import argparse

VERSION = "1.6.2"  # the clip-benchmark these flags were copied from

_TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "captioning",
          "image_caption_selection", "auto")

# (option strings, dest, nargs, action, type, choices, default), in CLIP_benchmark's order.
EVAL_FLAGS = (
    (("--dataset",), "dataset", "+", "store", str, None, "cifar10"),
    (("--dataset_root",), "dataset_root", None, "store", str, None, "root"),
    (("--split",), "split", None, "store", str, None, "test"),
    (("--test_split",), "split", None, "store", str, None, "test"),
    (("--train_split",), "train_split", "+", "store", str, None, "train"),
    (("--val_split",), "val_split", "+", "store", str, None, None),
    (("--val_proportion",), "val_proportion", "+", "store", float, None, None),
    (("--model",), "model", "+", "store", str, None, ["ViT-B-32-quickgelu"]),
    (("--pretrained",), "pretrained", "+", "store", str, None, ["laion400m_e32"]),
    (("--pretrained_model",), "pretrained_model", "+", "store", str, None, ""),
    (("--task",), "task", None, "store", str, _TASKS, "auto"),
    (("--no_amp",), "amp", 0, "store_false", None, None, True),
    (("--num_workers",), "num_workers", None, "store", int, None, 4),
    (("--recall_k",), "recall_k", "+", "store", int, None, [5]),
    (("--fewshot_k",), "fewshot_k", None, "store", int, None, -1),
    (("--fewshot_epochs",), "fewshot_epochs", None, "store", int, None, 10),
    (("--fewshot_lr",), "fewshot_lr", None, "store", float, None, 0.1),
    (("--skip_load",), "skip_load", 0, "store_true", None, None, False),
    (("--distributed",), "distributed", 0, "store_true", None, None, False),
    (("--seed",), "seed", None, "store", int, None, 0),
    (("--batch_size",), "batch_size", None, "store", int, None, 64),
    (("--normalize",), "normalize", None, "store", bool, None, True),
    (("--model_cache_dir",), "model_cache_dir", None, "store", str, None, None),
    (("--feature_root",), "feature_root", None, "store", str, None, "features"),
    (("--annotation_file",), "annotation_file", None, "store", str, None, ""),
    (("--custom_classname_file",), "custom_classname_file", None, "store", str, None, None),
    (("--custom_template_file",), "custom_template_file", None, "store", str, None, None),
    (("--dump_classnames",), "dump_classnames", 0, "store_true", None, None, False),
    (("--dump_templates",), "dump_templates", 0, "store_true", None, None, False),
    (("--language",), "language", "+", "store", str, None, "en"),
    (("--output",), "output", None, "store", str, None,
     "{dataset}_{pretrained}_{model}_{language}_{task}.json"),
    (("--quiet",), "verbose", 0, "store_false", None, None, True),
    (("--save_clf",), "save_clf", None, "store", str, None, None),
    (("--load_clfs",), "load_clfs", "+", "store", str, None, []),
    (("--skip_existing",), "skip_existing", 0, "store_true", None, None, False),
    (("--model_type",), "model_type", None, "store", str, ("open_clip", "ja_clip"), "open_clip"),
    (("--wds_cache_dir",), "wds_cache_dir", None, "store", str, None, None),
)

# CLIP_benchmark's --dataset_root default: the folder `root` in the working folder.
DEFAULT_DATASET_ROOT = next(row[-1] for row in EVAL_FLAGS if row[0] == ("--dataset_root",))

# Their help text, by first option string (None: they give none); `tokenprune eval --help`
# shows it from here, with HELP_OVERRIDES in its place where theirs misleads or is missing.
EVAL_HELP = {
    '--dataset': (
        'Dataset(s) to use for the benchmark. Can be the name of a dataset, or a '
        "collection name ('vtab', 'vtab+', 'imagenet_robustness', 'retrieval') or path "
        'of a text file where each line is a dataset name'),
    '--dataset_root': (
        'dataset root folder where the datasets are downloaded. Can be in the form of a '
        "template depending on dataset name, e.g., --dataset_root='datasets/{dataset}'. "
        'This is useful if you evaluate on multiple datasets.'),
    '--split': 'Dataset split to use',
    '--test_split': 'Dataset split to use',
    '--train_split': 'Dataset(s) train split names',
    '--val_split': 'Dataset(s) validation split names. Mutually exclusive with val_proportion.',
    '--val_proportion': (
        'what is the share of the train dataset will be used for validation part, if it '
        "doesn't predefined. Mutually exclusive with val_split"),
    '--model': 'Model architecture to use from OpenCLIP',
    '--pretrained': 'Model checkpoint name to use from OpenCLIP',
    '--pretrained_model': (
        'Pre-trained model(s) to use. Can be the full model name where `model` and '
        '`pretrained` are comma separated (e.g., '
        "--pretrained_model='ViT-B-32-quickgelu,laion400m_e32'), a model collection name "
        "('openai' or 'openclip_base' or 'openclip_multilingual' or 'openclip_all'), or "
        'path of a text file where each line is a model fullname where model and '
        'pretrained are comma separated (e.g., ViT-B-32-quickgelu,laion400m_e32). '
        '--model and --pretrained are ignored if --pretrained_model is used.'),
    '--task': (
        'Task to evaluate on. With --task=auto, the task is automatically inferred from '
        'the dataset.'),
    '--no_amp': 'whether to use mixed precision',
    '--num_workers': None,
    '--recall_k': 'for retrieval, select the k for Recall@K metric. ',
    '--fewshot_k': 'for linear probe, how many shots. -1 = whole dataset.',
    '--fewshot_epochs': 'for linear probe, how many epochs.',
    '--fewshot_lr': 'for linear probe, what is the learning rate.',
    '--skip_load': 'for linear probes, when everything is cached, no need to load model.',
    '--distributed': 'evaluation in parallel',
    '--seed': 'random seed.',
    '--batch_size': None,
    '--normalize': 'features normalization',
    '--model_cache_dir': 'directory to where downloaded models are cached',
    '--feature_root': 'feature root folder where the features are stored.',
    '--annotation_file': (
        'text annotation file for retrieval datasets. Only needed  for when `--task` is '
        '`zeroshot_retrieval`.'),
    '--custom_classname_file': (
        'use custom json file with classnames for each dataset, where keys are dataset '
        'names and values are list of classnames.'),
    '--custom_template_file': (
        'use custom json file with prompts for each dataset, where keys are dataset '
        'names and values are list of prompts. For instance, to use CuPL prompts, use '
        "--custom_template_file='cupl_prompts.json'"),
    '--dump_classnames': 'dump classnames to the results json file.',
    '--dump_templates': 'dump templates to the results json file.',
    '--language': 'language(s) of classname and prompts to use for zeroshot classification.',
    '--output': (
        'output file where to dump the metrics. Can be in form of a template, e.g., '
        "--output='{dataset}_{pretrained}_{model}_{language}_{task}.json'"),
    '--quiet': 'suppress verbose messages',
    '--save_clf': 'optionally save the classification layer output by the text tower',
    '--load_clfs': 'optionally load and average mutliple layers output by text towers.',
    '--skip_existing': 'whether to skip an evaluation if the output file exists.',
    '--model_type': 'clip model type',
    '--wds_cache_dir': 'optional cache directory for webdataset only',
}

AMP_HELP = ("turn off mixed precision (autocast), which CLIP_benchmark uses by default: float16 "
            "on CUDA, bfloat16 on the CPU, where it is often several times slower unless the "
            "CPU has native bfloat16 (AVX512-BF16 or AMX)")
HELP_OVERRIDES = {
    "--no_amp": AMP_HELP,  # theirs ("whether to use mixed precision") reads inverted
    "--num_workers": "DataLoader worker processes (default 4, or fewer: no more than the "
                     "CPUs here; a local WebDataset gets no more than it has shards)",
    "--batch_size": "images per batch (default 64)",
    # The shipped ViTs and their canvases (tokenprune/cli/shipped.py) are named here too.
    "--model": (EVAL_HELP["--model"] + ", or a ViT shipped with tokenprune: "
                "tokenprune:proxy-vit or tokenprune:proxy-vit-large (offline, no --pretrained)"),
    "--dataset": (EVAL_HELP["--dataset"] + "; or the shipped ViTs' held-out canvases: "
                  "tokenprune:digits or tokenprune:digits-large"),
}
# The eval flags `tokenprune sweep` uses, listed by `sweep --help` (it takes them all; the rest
# are linear-probe, retrieval or multi-run flags that it refuses or ignores).
SWEEP_FLAGS = ("--dataset", "--dataset_root", "--split", "--model", "--pretrained", "--task",
               "--no_amp", "--num_workers", "--seed", "--batch_size", "--model_cache_dir",
               "--custom_classname_file", "--custom_template_file", "--language", "--quiet",
               "--model_type", "--wds_cache_dir")


def describe(action):
    """An argparse action as an EVAL_FLAGS row (what the test compares)."""
    kind = {argparse._StoreTrueAction: "store_true",
            argparse._StoreFalseAction: "store_false"}.get(type(action), "store")
    choices = tuple(action.choices) if action.choices is not None else None
    return (tuple(action.option_strings), action.dest, action.nargs, kind, action.type, choices,
            action.default)


def flags_trusted():
    """Whether the installed clip-benchmark is the version EVAL_FLAGS was copied from."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("clip-benchmark") == VERSION
    except PackageNotFoundError:
        return False


def add_eval_flags(parser, shown=None):
    """CLIP_benchmark's eval flags, in a group of `parser`; `--help` shows those in `shown`
    (default: all) with their help text."""
    group = parser.add_argument_group("CLIP_benchmark's eval flags")
    for option_strings, dest, nargs, kind, type_, choices, default in EVAL_FLAGS:
        flag = option_strings[0]
        help_text = (argparse.SUPPRESS if shown is not None and flag not in shown else
                     HELP_OVERRIDES.get(flag, EVAL_HELP[flag]))
        if kind == "store":
            group.add_argument(*option_strings, dest=dest, nargs=nargs, type=type_,
                               choices=choices, default=default, help=help_text)
        else:
            group.add_argument(*option_strings, dest=dest, action=kind, default=default,
                               help=help_text)
