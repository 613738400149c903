"""The commands, one module each. A command module has
- NAME, HELP (its line in `tokenprune --help`) and DESCRIPTION (the top of its own --help);
- add_arguments(parser): its flags (the ones several commands share come from ../flags.py);
- check(args, argv): its checks, made before anything heavy is imported, so that bad input is
  answered at once (argv: the command line as given, for flags that must be told apart from
  their defaults);
- run(args, argv): what it does, importing there what it needs (torch, open_clip,
  clip_benchmark, transformers);
and, where it needs them, PASS_ON (what follows `--` goes, as it is, to args.<PASS_ON>) and
leaves_unknown_flags() (flags its parser does not know are left to the command to judge).

tokenprune/cli/__init__.py builds the parser from COMMANDS, in this order, and runs the one
the command line names. Nothing heavy is imported here: `--help` builds every command's parser.
"""
from . import build, generate, lmms_sweep, sweep, visualize
from . import eval as evaluate  # `eval` is also a builtin

COMMANDS = (evaluate, sweep, build, visualize, generate, lmms_sweep)
