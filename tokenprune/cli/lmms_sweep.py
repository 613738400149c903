"""tokenprune lmms-sweep: the unpruned model and a list of pruning settings on the same
lmms-eval tasks, one table and one plot (the engine: tokenprune/lmms/sweep.py)."""
import importlib.util
import os

from .common import CLIError, _check_writable


def check_lmms_sweep_args(args):
    """Everything that can be checked before lmms-eval runs: the model, the settings, the
    folder; lmms-eval installed."""
    from ..lmms import MODELS, PRUNING_ARGUMENTS
    from ..lmms.sweep import parse_setting
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
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out}: a file, not a folder")
    _check_writable("--out", args.out, args.out, create=True)
    if importlib.util.find_spec("lmms_eval") is None:
        raise CLIError('lmms-eval is not installed: pip install "tokenprune[lmms]"')


def run_lmms_sweep(args):
    from ..lmms.sweep import run_sweep
    os.makedirs(args.out, exist_ok=True)
    rows = run_sweep(args.model, args.model_args, args.tasks, args.settings, args.out,
                     args.batch_size, args.lmms_args)
    print(f"wrote {os.path.join(args.out, 'summary.md')} ({len(rows)} rows), results.csv, "
          "results.json and score_vs_image_tokens.png")
