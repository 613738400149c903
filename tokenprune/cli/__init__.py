"""The `tokenprune` command line. One module per command in commands/ (`eval`: CLIP_benchmark's
zero-shot evaluation with token pruning; `sweep`: a grid of settings in one pass; `build`:
results JSON files to one CSV; `visualize`: draw the kept tokens; `generate`: the answers of a
vision-language model that sees fewer image tokens; `lmms-sweep`: lmms-eval's scores of such
models), each with its name, help, flags, checks and run; this module builds the parser from
their list (commands.COMMANDS) and runs the one chosen. Commands sit on the library
(tokenprune/); the library never imports them.

    tokenprune eval --dataset cifar10 --model ViT-B-16 --pretrained openai --enable_pruning
    tokenprune visualize                      # first-run demo, offline, writes kept.png
    tokenprune generate --model llava-hf/llava-1.5-7b-hf --image cat.png --prompt "What is it?"

The command line is parsed first with a light parser (stdlib only: no torch, open_clip,
clip_benchmark or transformers), and the chosen command checks its flags before it imports
anything heavy, so that `--help`, a misspelled flag or a bad pruning value are answered at once.
Flags may be spelled with hyphens (`--enable-pruning`) as well as underscores. Bad input ends
with one line on stderr, `tokenprune: error: ...`, and exit status 1 (2 for argument errors);
TOKENPRUNE_DEBUG=1 also prints the traceback of the original error.
"""
import difflib
import os
import sys
import traceback

from .. import __version__
from ..vlm.families import FAMILIES
from .commands import COMMANDS
from .common import DEBUG_ENV, PROG, CLIError, OneLineParser
from .loading import torchvision_mismatch_message


# name -> the module of that command.
BY_NAME = {command.NAME: command for command in COMMANDS}


def family_names():
    """The vision-language families, by name, from tokenprune/vlm/families.py (no torch)."""
    from ..vlm.families import FAMILIES
    return ", ".join(family.name for family in FAMILIES.values())


def build_parser():
    """The light parser: every command's flags, nothing heavy imported. A command's parser is
    `parser.subcommands[name]`; parsing sets `which`, the command's name (as CLIP_benchmark's
    own parser does for its commands)."""
    families = ", ".join(family.name for family in FAMILIES.values())
    parser = OneLineParser(prog=PROG, description=(
        "Training-free visual token pruning for Vision Transformers (OpenCLIP, timm, Hugging "
        f"Face) and for the image tokens of vision-language models ({families}). Flags take "
        "hyphens or underscores."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.NAME, help=command.HELP,
                                          description=command.DESCRIPTION)
        command.add_arguments(subparser)
        subparser.set_defaults(which=command.NAME)
    parser.subcommands = subparsers.choices
    return parser


def _option_strings(parser):
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def accept_hyphens(argv, known):
    """`--enable-pruning` -> `--enable_pruning` (also `--k-anchors=5`) where the underscore
    spelling is one of the `known` flags. Values and everything after `--` are left alone."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "-" in name[2:]:
            underscored = "--" + name[2:].replace("-", "_")
            if underscored in known:
                arg = underscored + eq + value
        out.append(arg)
    return out


def unrecognized(extras, parser):
    """The error message for flags that `parser` does not know, with the likely ones."""
    known = sorted(_option_strings(parser))
    hints = []
    for arg in extras:
        name = arg.partition("=")[0]
        if not name.startswith("--"):
            continue
        underscored = "--" + name[2:].replace("-", "_")
        if underscored == "--enable_pruning" and underscored not in known:
            hints.append(f"{parser.prog} always prunes: leave out {name}")
            continue
        if underscored == "--schedule" and underscored not in known:
            hints.append(f"{parser.prog} takes no schedule yet (one pruned block, --layer); "
                         f"`{PROG} eval` takes {name}")
            continue
        close = difflib.get_close_matches(underscored, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"did you mean {close[0]} instead of {name}?")
    return f"unrecognized arguments: {' '.join(extras)}" + "".join(f"; {h}" for h in hints)


def _run(command, args, argv):
    """The command's checks (nothing heavy imported yet), then the command."""
    command.check(args, argv)
    command.run(args, argv)


def main(argv=None):
    """Run the command line; returns the exit status (argument errors raise SystemExit(2))."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first word that is not a flag (the top level has no other flags).
    command = BY_NAME.get(next((arg for arg in argv if not arg.startswith("-")), None))
    passed_on = []  # what follows `--`, for a command that hands it on (lmms-sweep: lmms-eval)
    if getattr(command, "PASS_ON", None) and "--" in argv:
        cut = argv.index("--")
        argv, passed_on = argv[:cut], argv[cut + 1:]
    if command is not None:
        argv = accept_hyphens(argv, _option_strings(parser.subcommands[command.NAME]))
    args, extras = parser.parse_known_args(argv)
    command = BY_NAME.get(getattr(args, "which", None))
    if command is None:
        parser.print_help()
        return 0
    if getattr(command, "PASS_ON", None):
        setattr(args, command.PASS_ON, passed_on)
    subparser = parser.subcommands[command.NAME]
    if extras and not getattr(command, "leaves_unknown_flags", lambda: False)():
        subparser.error(unrecognized(extras, subparser))
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        _run(command, args, argv)
    except CLIError as err:
        if debug:
            traceback.print_exception(type(err), err, err.__traceback__)
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback on request
        # Importing a command's modules imports torchvision (through open_clip), which fails
        # when its build does not match torch's.
        mismatch = torchvision_mismatch_message(err)
        if debug:
            if not mismatch:
                raise
            traceback.print_exception(type(err), err, err.__traceback__)
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(f"{PROG}: error: " + (mismatch or f"{type(err).__name__}: {first_line} (set "
                                               f"{DEBUG_ENV}=1 for the traceback)"),
              file=sys.stderr)
        return 1
    return 0
