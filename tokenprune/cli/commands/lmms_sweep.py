"""`tokenprune lmms-sweep`: the unpruned model and a list of pruning settings on the same
lmms-eval tasks, one table and one plot (the engine: tokenprune/lmms/sweep.py). Everything that
can be is checked before lmms-eval runs; the settings' pruning arguments are lmms-eval's model
arguments of tokenprune's models (tokenprune.lmms.PRUNING_ARGUMENTS)."""
import importlib.util
import json
import os

from ...lmms import MODELS, PRUNING_ARGUMENTS
from ..checks import check_writable
from ..common import CLIError

NAME = "lmms-sweep"
HELP = ("answer quality in lmms-eval: the unpruned model and pruning settings on the same tasks, "
        "one table and one plot")
DESCRIPTION = ("Runs lmms-eval (pip install \"tokenprune[lmms]\") on --tasks with the unpruned "
               "model, then with each --setting; writes summary.md, results.csv, results.json "
               "and score_vs_image_tokens.png into --out. Settings already run there are not "
               "run again. Arguments after -- go to lmms-eval as they are (e.g. -- --limit 100 "
               "--include_path DIR).")
PASS_ON = "lmms_args"  # what follows `--` on the command line: lmms-eval's own arguments
# lmms-eval's model for LLaVA-1.5: the one whose base has no `layer` (Qwen-VL's do).
LLAVA_MODEL = "tokenprune_llava_hf"


def add_arguments(parser):
    parser.add_argument("--model", default=LLAVA_MODEL,
                        help=f"tokenprune's lmms-eval model: {', '.join(MODELS)} (default "
                             "%(default)s)")
    parser.add_argument("--model_args", required=True,
                        help="lmms-eval's --model_args for the base model, without pruning "
                             "arguments, e.g. pretrained=llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--tasks", required=True, help="lmms-eval tasks, e.g. mme,pope")
    parser.add_argument("--setting", action="append", required=True, metavar="ARGS",
                        help="pruning arguments of one run, e.g. k_anchors=8,top_m=56 or "
                             "ratio=0.25,selection=cls; repeat the flag for each setting (the "
                             f"arguments: {', '.join(PRUNING_ARGUMENTS)})")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="prompts per generate call (default %(default)s)")
    parser.add_argument("--out", default="lmms_sweep",
                        help="output folder (default %(default)s); its finished runs are kept")


def check(args, argv):
    check_lmms_sweep_args(args)


def run(args, argv):
    run_lmms_sweep(args)


def check_lmms_sweep_args(args):
    """Everything that can be checked before lmms-eval runs: the model, the settings, the
    folder; lmms-eval installed."""
    from ...lmms.sweep import parse_setting
    if args.model not in MODELS:
        raise CLIError(f"--model {args.model}: not one of tokenprune's lmms-eval models "
                       f"({', '.join(MODELS)})")
    given = {item.partition("=")[0].strip() for item in args.model_args.split(",")}
    mixed = sorted(given & set(PRUNING_ARGUMENTS))
    if mixed:
        raise CLIError(f"--model_args holds pruning arguments ({', '.join(mixed)}): give them "
                       "with --setting, so that the unpruned run is unpruned")
    if args.batch_size < 1:
        raise CLIError(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        args.settings = [parse_setting(args.model, text) for text in args.setting]
    except ValueError as err:
        raise CLIError(str(err)) from None
    check_setting_layers(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out}: a file, not a folder")
    check_writable("--out", args.out, args.out, create=True)
    if importlib.util.find_spec("lmms_eval") is None:
        raise CLIError('lmms-eval is not installed: pip install "tokenprune[lmms]"')


def models_taking_layer():
    """The lmms-eval models all of whose families can cut inside the vision tower (`layer`),
    from tokenprune/vlm/families.py and each family's class (which imports torch)."""
    from ...vlm.families import FAMILIES
    taking = {}
    for family in FAMILIES.values():
        if family.lmms_model is not None:
            model = f"tokenprune_{family.lmms_model}"
            takes = family.pruning_class().layer_inside_tower
            taking[model] = taking.get(model, True) and takes
    return [model for model, takes in taking.items() if takes]


def check_setting_layers(args):
    """Every setting's layer, before the first (unpruned) run: the LLaVA model takes none, and
    a Qwen-VL model's config (a pretrained= folder, or the Hugging Face cache) says which blocks
    it has. Without this, a bad layer failed after the unpruned run, its reason in a log."""
    with_layer = [(text, setting) for text, setting in zip(args.setting, args.settings)
                  if "layer" in setting]
    if not with_layer:
        return
    taking = models_taking_layer()
    if args.model not in taking:
        text, _ = with_layer[0]
        where = ("at the vision block whose output LLaVA uses" if args.model == LLAVA_MODEL
                 else "where its family's section of SPEC.md says")
        raise CLIError(f"--setting {text!r}: layer is for the Qwen-VL models "
                       f"({', '.join(taking)}); {args.model} prunes {where}: leave layer out")
    from ..generate import layer_problem
    config = _pretrained_config(args.model_args)
    if config is None:
        return  # known once lmms-eval loads the model: its run then fails, in its log
    pretrained = _model_arguments(args.model_args).get("pretrained")
    for text, setting in with_layer:
        problem = layer_problem(pretrained, config, setting["layer"], name="layer")
        if problem:
            raise CLIError(f"--setting {text!r}: {problem}")


def _model_arguments(model_args):
    """lmms-eval's --model_args as a dict of strings."""
    pairs = (item.partition("=") for item in model_args.split(","))
    return {name.strip(): value.strip() for name, eq, value in pairs if eq}


def _pretrained_config(model_args):
    """config.json of --model_args' pretrained= as a dict: a saved folder's, or the Hugging Face
    cache's for a hub id; None when neither holds it."""
    pretrained = _model_arguments(model_args).get("pretrained")
    if not pretrained:
        return None
    path = os.path.join(pretrained, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache
            path = try_to_load_from_cache(pretrained, "config.json")
        except Exception:  # noqa: BLE001 - not a hub id either: lmms-eval will say what it is
            return None
        if not isinstance(path, str):
            return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def run_lmms_sweep(args):
    from ...lmms.sweep import run_sweep
    os.makedirs(args.out, exist_ok=True)
    rows = run_sweep(args.model, args.model_args, args.tasks, args.settings, args.out,
                     args.batch_size, args.lmms_args)
    print(f"wrote {os.path.join(args.out, 'summary.md')} ({len(rows)} rows), results.csv, "
          "results.json and score_vs_image_tokens.png")
