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


def add_eval_flags(parser):
    """CLIP_benchmark's eval flags, without their help (see `tokenprune eval --help`)."""
    for option_strings, dest, nargs, kind, type_, choices, default in EVAL_FLAGS:
        if kind == "store":
            parser.add_argument(*option_strings, dest=dest, nargs=nargs, type=type_,
                                choices=choices, default=default, help=argparse.SUPPRESS)
        else:
            parser.add_argument(*option_strings, dest=dest, action=kind, default=default,
                                help=argparse.SUPPRESS)
