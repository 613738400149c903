"""The `tokenprune` command line: `eval` (CLIP_benchmark's evaluation with token pruning),
`build` (CLIP_benchmark's CSV builder, unchanged) and `visualize` (draw the kept tokens).

    tokenprune eval --dataset cifar10 --model ViT-B-16 --pretrained openai --enable_pruning
    tokenprune visualize                      # first-run demo, offline, writes kept.png

`eval` and `build` use CLIP_benchmark's own argument parser, extended with the pruning flags,
so every CLIP_benchmark `eval` flag works unchanged (see tokenprune/evaluate.py for how the
pruning reaches the model CLIP_benchmark loads). Bad input ends with one line on stderr,
`tokenprune: error: ...`, and exit status 1 (2 for argument errors); set TOKENPRUNE_DEBUG=1
to see the traceback instead.
"""
import argparse
import difflib
import logging
import os
import sys
import types
from contextlib import contextmanager
from dataclasses import asdict
from unittest import mock

from .config import BACKENDS, SCORE_NORMS, PruneConfig

PROG = "tokenprune"
DEBUG_ENV = "TOKENPRUNE_DEBUG"
# The flags' defaults are PruneConfig's (the seed's k_anchors 10, top_m 50, alpha 0.5, and ours).
PRUNING_DEFAULTS = asdict(PruneConfig())


class CLIError(Exception):
    """Bad input: main() prints the message on one line and exits with status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line instead of a screenful of usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _clip_benchmark_parser():
    """CLIP_benchmark's own parser (subcommands `eval` and `build`), built by its own code.

    `clip_benchmark.cli.get_parser_args()` builds the parser and parses sys.argv in one go;
    we let it build with our parser class, whose parse_args is a no-op while capturing, and
    parse later.
    """
    from clip_benchmark import cli as cb_cli

    class Capturing(_Parser):
        capturing = True

        def __init__(self, *args, prog=None, **kwargs):
            super().__init__(*args, prog=prog or PROG, **kwargs)

        def parse_args(self, args=None, namespace=None):
            if Capturing.capturing:
                return argparse.Namespace()
            return super().parse_args(args, namespace)

    # Only clip_benchmark.cli sees the swap: its `argparse` becomes a copy with our class.
    argparse_copy = types.SimpleNamespace(**{**vars(argparse), "ArgumentParser": Capturing})
    with mock.patch.object(cb_cli, "argparse", argparse_copy):
        parser, _ = cb_cli.get_parser_args()
    Capturing.capturing = False
    parser.description = ("Training-free visual token pruning for OpenCLIP ViTs. `eval` is "
                          "CLIP_benchmark's eval plus the pruning flags.")
    return parser


def _subcommands(parser):
    for action in parser._actions:  # argparse keeps no public handle on its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("CLIP_benchmark's parser has no subcommands; is clip-benchmark >= 1.6 "
                       "installed?")


def add_pruning_arguments(parser, always_on=False):
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
                       help="index of the pruned block, negative from the end (default -1, "
                            "the last block)")
    group.add_argument("--backend", choices=BACKENDS, default=d["backend"],
                       help="'auto' (Triton on CUDA, else PyTorch; default), 'triton' or "
                            "'reference'")


def build_parser():
    parser = _clip_benchmark_parser()
    subcommands = _subcommands(parser)
    add_pruning_arguments(subcommands.choices["eval"])
    visualize = subcommands.add_parser(
        "visualize", help="Draw an image with its anchor, kept and pruned patches",
        description="Draw an image with the anchors and the kept patches marked and the pruned "
                    "ones dimmed. With no arguments: the built-in sample image and a "
                    "random-weight ViT-B-16, offline.")
    visualize.add_argument("--image", default=None,
                           help="image file (default: the built-in sample picture)")
    visualize.add_argument("--model", default="ViT-B-16",
                           help="OpenCLIP ViT architecture, or local-dir:/path "
                                "(default %(default)s)")
    visualize.add_argument("--pretrained", default=None,
                           help="pretrained tag (e.g. openai; downloads once) or local checkpoint "
                                "file (default: none, random weights)")
    visualize.add_argument("--model_cache_dir", default=None,
                           help="where downloaded weights are cached")
    visualize.add_argument("--device", default=None,
                           help="torch device (default: cuda if available, else cpu)")
    visualize.add_argument("--out", default="kept.png", help="output PNG (default %(default)s)")
    add_pruning_arguments(visualize, always_on=True)
    visualize.set_defaults(which="visualize")
    return parser


def prune_config(args):
    """The PruneConfig of the parsed flags; a bad value is a CLIError naming the flag."""
    try:
        return PruneConfig(**{name: getattr(args, name, default)
                              for name, default in PRUNING_DEFAULTS.items()})
    except ValueError as err:
        raise CLIError(f"--{err}") from None


# ----- model names, pretrained weights and their errors (shared by eval and visualize) -------

def check_model(model_name, pretrained, pruning):
    """Fail early, before any download, on an unknown architecture or pretrained tag, and on a
    tower that cannot be pruned. Names with a schema (hf-hub:, local-dir:) are left to OpenCLIP."""
    import open_clip
    from open_clip.factory import parse_model_name

    try:
        schema, identifier = parse_model_name(model_name)
    except ValueError as err:
        raise CLIError(f"--model {model_name}: {err}") from None
    if schema == "local-dir":
        if not os.path.isfile(os.path.join(identifier, "open_clip_config.json")):
            raise CLIError(f"--model {model_name}: no open_clip_config.json in {identifier!r}")
        return
    if schema is not None:
        return
    name = model_name.replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise CLIError(f"unknown model {model_name!r}: not an OpenCLIP architecture.{hint} "
                       "List them with `python -c \"import open_clip; "
                       "print(open_clip.list_models())\"`, or use "
                       "--model local-dir:/path/to/folder")
    if pretrained and not os.path.isfile(pretrained):
        from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
        if not get_pretrained_cfg(name, pretrained):
            if os.sep in pretrained or os.path.splitext(pretrained)[1]:
                raise CLIError(f"--pretrained {pretrained}: no such checkpoint file")
            tags = ", ".join(list_pretrained_tags_by_model(name)) or "none"
            raise CLIError(f"unknown pretrained tag {pretrained!r} for {model_name} (known tags: "
                           f"{tags}); a local checkpoint file also works: --pretrained PATH")
    if pruning:
        from .towers import refused_by_config, supported
        tower = refused_by_config(config.get("vision_cfg", {}))
        if tower:
            raise CLIError(f"--enable_pruning: {model_name} has {tower}, which cannot be "
                           f"pruned; tokenprune supports OpenCLIP models whose image tower is "
                           f"one of: {supported()}")


class _DropLog(logging.Filter):
    """Drops OpenCLIP log records that our own messages repeat."""

    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record):
        return not str(record.msg).startswith(self.prefixes)


@contextmanager
def loading_errors(model_name, pretrained, random_weights_noted=False):
    """Turn OpenCLIP's loading failures into one-line CLIErrors that say what to do.

    OpenCLIP logs a download failure before raising it: our error says it, so that log is
    dropped, as is its random-weights warning when the caller has already printed a note."""
    prefixes = ("Failed to download weights", "Pretrained tag or path")
    log_filter = _DropLog(prefixes + (("No pretrained weights loaded",)
                                      if random_weights_noted else ()))
    logging.getLogger().addFilter(log_filter)
    try:
        yield
    except CLIError:
        raise
    except Exception as err:  # noqa: BLE001 - translated, not swallowed
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "download" in first_line.lower() or "hf hub" in first_line.lower():
            raise CLIError(
                f"could not download the pretrained weights {pretrained!r} for {model_name} "
                "(no internet access?). Run once where downloads work, or fetch the checkpoint "
                "elsewhere and pass the file: --pretrained /path/to/open_clip_pytorch_model.bin "
                "(set HF_HUB_OFFLINE=1 to skip the download retries)") from None
        raise CLIError(f"could not load model {model_name!r} with pretrained {pretrained!r}: "
                       f"{first_line}") from None
    finally:
        logging.getLogger().removeFilter(log_filter)


# ----- entry point -------------------------------------------------------------------------

def main(argv=None):
    """Run the command line; returns the exit status (argument errors raise SystemExit(2))."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "which"):
        parser.print_help()
        return 0
    try:
        if args.which == "eval":
            from .evaluate import run_eval
            run_eval(args)
        elif args.which == "visualize":
            from .visualize import run_visualize
            run_visualize(args)
        else:
            from clip_benchmark.cli import main_build
            main_build(args)
    except CLIError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback on request
        if os.environ.get(DEBUG_ENV):
            raise
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(f"{PROG}: error: {type(err).__name__}: {first_line} (set {DEBUG_ENV}=1 for the "
              "traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # `python -m tokenprune.cli`: run the importable module, not this __main__ copy, so that
    # CLIError raised in tokenprune.evaluate is the class main() catches.
    from tokenprune.cli import main as _main
    sys.exit(_main())
