"""The command line's layout: one module per command, the pruning flags declared once with the
library's defaults, --help that imports nothing heavy, one way to swap attributes. Offline, no
model is loaded."""
import ast
import inspect
import json
import os
import subprocess
import sys
import types

import pytest

from tokenprune.cli import build_parser
from tokenprune.cli.commands import COMMANDS
from tokenprune.cli.flags import FLAGS, IMAGE_TOKEN_DEFAULTS, VIT_FLAGS, allowed
from tokenprune.cli.swap import swapped
from tokenprune.config import (IMAGE_TOKEN_ARGUMENTS, IMAGE_TOKEN_TOP_M, ImageTokenConfig,
                               PruneConfig)

CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenprune",
                   "cli")
HEAVY = ("torch", "open_clip", "clip_benchmark", "transformers")


def shown(value):
    """A default as --help writes it."""
    return "none" if value is None else str(value)


def flag_help(parser):
    """{dest: the help text as --help prints it, on one line} of a parser's flags."""
    formatter = parser._get_formatter()
    return {action.dest: " ".join(formatter._expand_help(action).split())
            for action in parser._actions if action.help}


def parser_of(name):
    return build_parser().subcommands[name]


@pytest.mark.parametrize("command", ["eval", "visualize"])
def test_vit_flags_show_prune_configs_defaults(command):
    """eval's and visualize's pruning flags say PruneConfig's defaults in --help, and have them
    (visualize's k and m: the shipped model's, else PruneConfig's)."""
    parser = parser_of(command)
    helps = flag_help(parser)
    config = PruneConfig()
    for name in VIT_FLAGS:
        if name == "schedule":
            assert parser.get_default(name) == config.schedule == ()
            continue
        default = getattr(config, name)
        if command == "visualize" and name in ("k_anchors", "top_m"):
            assert parser.get_default(name) is None  # the model that runs decides
            assert f", else {default}" in helps[name], helps[name]
            continue
        assert f"default {shown(default)}" in helps[name], helps[name]
        if not (command == "visualize" and name == "selection"):
            assert parser.get_default(name) == default, name


def test_sweep_grids_hold_prune_configs_defaults():
    """sweep's default lists are a grid that holds PruneConfig's default, and --help says them."""
    parser = parser_of("sweep")
    helps = flag_help(parser)
    config = PruneConfig()
    for name in VIT_FLAGS:
        default = getattr(config, name)
        if name == "schedule":
            assert parser.get_default(name) == []
        elif name == "backend":
            assert parser.get_default(name) == default
            assert f"default {default}" in helps[name]
        else:
            grid = parser.get_default(name)
            assert default in grid, name
            assert f"(default: {' '.join(map(str, grid))})" in helps[name], helps[name]


def test_generate_flags_show_image_token_configs_defaults():
    """generate's pruning flags are prune_image_tokens' arguments, with ImageTokenConfig's
    defaults in --help (top_m: IMAGE_TOKEN_TOP_M unless --ratio) and prune_image_tokens'
    layer=None."""
    from tokenprune.vlm.prune import prune_image_tokens
    parser = parser_of("generate")
    helps = flag_help(parser)
    config = ImageTokenConfig()
    for name in IMAGE_TOKEN_ARGUMENTS:
        if name == "layer":
            default = inspect.signature(prune_image_tokens).parameters["layer"].default
            assert parser.get_default(name) == default is None
            assert "default: the last block" in helps[name]
            continue
        assert f"default {shown(getattr(config, name))}" in helps[name], helps[name]
    assert parser.get_default("top_m") is None and config.top_m == IMAGE_TOKEN_TOP_M
    assert {name: parser.get_default(name) for name in IMAGE_TOKEN_ARGUMENTS} == \
        IMAGE_TOKEN_DEFAULTS


def test_image_token_arguments_are_prune_image_tokens_own():
    """config.IMAGE_TOKEN_ARGUMENTS (generate's flags, the lmms-eval model arguments) are the
    pruning arguments of prune_image_tokens, of the kinds its signature says."""
    import typing

    from tokenprune.lmms import PRUNING_ARGUMENTS
    from tokenprune.vlm.prune import prune_image_tokens
    parameters = dict(inspect.signature(prune_image_tokens).parameters)
    del parameters["model"], parameters["processor"]
    kinds = {name: next(kind for kind in (typing.get_args(p.annotation) or (p.annotation,))
                        if kind is not type(None))
             for name, p in parameters.items()}
    assert kinds == IMAGE_TOKEN_ARGUMENTS
    assert PRUNING_ARGUMENTS == {name: kind.__name__ for name, kind in kinds.items()}


def test_help_ranges_are_the_configs_own_words():
    assert allowed(PruneConfig, "k_anchors") == "an integer >= 1"
    assert allowed(PruneConfig, "alpha") == "a finite number in [0, 1]"
    assert allowed(ImageTokenConfig, "ratio") == "a number in (0, 1]"
    assert allowed(ImageTokenConfig, "layer") is None  # checked once the model is known
    for name in ("k_anchors", "top_m", "alpha", "mmr_lambda"):  # what a bad value is told
        with pytest.raises(ValueError) as err:
            PruneConfig(**{name: -7})
        assert f"{name} must be {allowed(PruneConfig, name)}, got -7" in str(err.value)


def test_each_pruning_flag_is_declared_once():
    """In tokenprune/cli/, each pruning flag's option string is a key of one table (FLAGS in
    flags.py), and no add_argument call spells one out."""
    declared = {option: [] for option in FLAGS}
    for folder, _, files in os.walk(CLI):
        for name in files:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Dict):
                    for key in node.keys:
                        if isinstance(key, ast.Constant) and key.value in declared:
                            declared[key.value].append(name)
                if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) ==
                        "add_argument" and node.args and isinstance(node.args[0], ast.Constant)):
                    assert node.args[0].value not in FLAGS, (name, node.args[0].value)
    assert declared == {option: ["flags.py"] for option in FLAGS}


def test_every_command_module_has_the_same_parts():
    parser = build_parser()
    assert list(parser.subcommands) == [command.NAME for command in COMMANDS]
    for command in COMMANDS:
        for part in ("NAME", "HELP", "DESCRIPTION", "add_arguments", "check", "run"):
            assert hasattr(command, part), (command.__name__, part)
        assert parser.subcommands[command.NAME].get_default("which") == command.NAME


HELP_CHECK = r"""
import json, sys
from tokenprune.cli import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit:
    pass
print(json.dumps(sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)))
"""


@pytest.mark.parametrize("command", [None] + [command.NAME for command in COMMANDS])
def test_help_of_every_command_imports_nothing_heavy(tmp_path, command):
    """`--help` builds every command's parser: no command module imports torch, open_clip,
    clip_benchmark or transformers before its run (what keeps --help fast)."""
    argv = [command, "--help"] if command else ["--help"]
    proc = subprocess.run([sys.executable, "-c", HELP_CHECK, json.dumps(argv),
                           json.dumps(HEAVY)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], proc.stderr


def test_swapped_puts_the_originals_back():
    owner = types.SimpleNamespace(a=1, b=2)
    with pytest.raises(RuntimeError):
        with swapped([(owner, "a", 10), (owner, "b", 20)]):
            assert (owner.a, owner.b) == (10, 20)
            raise RuntimeError
    assert (owner.a, owner.b) == (1, 2)
    with pytest.raises(AttributeError):
        with swapped([(owner, "a", 10), (owner, "missing", 0)]):
            pass
    assert owner.a == 1
