"""The `tokenprune` command line: `eval` (CLIP_benchmark's evaluation with token pruning),
`sweep` (a grid of settings in one pass), `build` (results JSON files to one CSV),
`visualize` (draw the kept tokens) and `generate` (a LLaVA model's answers with fewer image
tokens). One module per command beside this one; `common.py` holds
what they share. Commands sit on the library (tokenprune/); the library never imports them.

    tokenprune eval --dataset cifar10 --model ViT-B-16 --pretrained openai --enable_pruning
    tokenprune visualize                      # first-run demo, offline, writes kept.png
    tokenprune generate --model llava-hf/llava-1.5-7b-hf --image cat.png --prompt "What is it?"

The command line is checked first with a light parser of our own (stdlib only: no torch,
open_clip or clip_benchmark), so that `--help`, a misspelled flag or a bad pruning value are
answered at once. Only a command that passes those checks imports what it runs; `eval` then
parses the command line again with CLIP_benchmark's own parser (tokenprune/cli/evaluate.py), so
every CLIP_benchmark `eval` flag works unchanged. Flags may be spelled with hyphens
(`--enable-pruning`) as well as underscores. Bad input ends with one line on stderr,
`tokenprune: error: ...`, and exit status 1 (2 for argument errors); TOKENPRUNE_DEBUG=1 also
prints the traceback of the original error.
"""
import difflib
import os
import sys
import traceback

from .. import __version__
from ..config import (BACKENDS, IMAGE_TOKEN_SELECTION, IMAGE_TOKEN_TOP_M, MMR_LAMBDA,
                      SCORE_NORMS, SELECTIONS)
from . import clip_benchmark_flags
from .common import (DEBUG_ENV, PROG, SHIPPED_MODEL_PRUNING, CLIError, OneLineParser,
                     add_pruning_arguments, add_sweep_arguments, add_tokenizer_argument,
                     add_verbose_argument, check_datasets, check_eval_output, check_image_output,
                     check_run_flags, check_shipped, check_sweep_output, prune_config,
                     sweep_lists, torchvision_mismatch_message, use_shipped_model,
                     webdataset_workers)


def add_visualize_arguments(parser):
    parser.add_argument("--image", default=None,
                        help="image file (default: the built-in sample picture)")
    parser.add_argument("--model", default=None,
                        help="OpenCLIP ViT architecture, or local-dir:/path (default: the small "
                             "ViT shipped with tokenprune; ViT-B-16 with --image or --pretrained)")
    parser.add_argument("--pretrained", default=None,
                        help="pretrained tag (e.g. openai; downloads once) or local checkpoint "
                             "file (default: none, random weights, seeded)")
    parser.add_argument("--model_cache_dir", default=None,
                        help="where downloaded weights are cached")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="kept.png", help="output PNG (default %(default)s)")
    add_pruning_arguments(parser, always_on=True)  # with --schedule, a panel per stage
    # None until visualize.use_shipped_model knows which model runs: k and m suit its patch count.
    for name, shipped in SHIPPED_MODEL_PRUNING.items():
        action = parser._option_string_actions[f"--{name}"]
        action.help = action.help.replace("%(default)s", f"{shipped} for the shipped model, "
                                          f"else {action.default}")
        action.default = None
    # No --selection with the shipped model: the picture shows score, cls and mmr side by side.
    action = parser._option_string_actions["--selection"]
    action.help += ("; without it, the shipped model's picture shows score, cls and mmr side "
                    "by side")
    action.default = None


def add_generate_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="a LLaVA, Qwen-VL or InternVL model: hub id "
                             "(llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct, "
                             "OpenGVLab/InternVL3-8B-hf) or a folder saved with "
                             "save_pretrained (model and processor)")
    parser.add_argument("--image", action="append", required=True, metavar="FILE",
                        help="image file; repeat the flag for several (one batch, one answer "
                             "each)")
    parser.add_argument("--prompt", required=True,
                        help="the question, asked about every image; the processor's chat "
                             "template adds the image, unless the prompt holds <image> itself")
    parser.add_argument("--compare", action="store_true",
                        help="also run the unpruned model on the same inputs, first")
    parser.add_argument("--max_new_tokens", type=int, default=32,
                        help="tokens to generate per answer (default %(default)s)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        default="auto", help="weights' dtype (default auto: float16 on CUDA, "
                                             "float32 on the CPU)")
    group = parser.add_argument_group(
        "token pruning (tokenprune)",
        "The language model sees k_anchors + top_m image tokens per image (or, with --ratio, that "
        "fraction of them), selected at the vision block whose output LLaVA uses, or at a "
        "Qwen-VL tower's last block (or its block --layer).")
    group.add_argument("--k_anchors", type=int, default=10,
                       help="anchor patches chosen by the CLS attention (>= 1, default "
                            "%(default)s)")
    group.add_argument("--top_m", type=int, default=None,
                       help=f"further tokens kept by the selection (>= 0, default "
                            f"{IMAGE_TOKEN_TOP_M}: 64 image tokens with the default k_anchors)")
    group.add_argument("--ratio", type=float, default=None,
                       help="keep ceil(ratio * n) of an image's n tokens instead, in (0, 1]; "
                            "not with --top_m")
    group.add_argument("--selection", choices=SELECTIONS, default=IMAGE_TOKEN_SELECTION,
                       help="how the tokens after the anchors are chosen (default %(default)s; "
                            "docs/selections.md)")
    group.add_argument("--layer", type=int, default=None,
                       help="Qwen-VL only: select at this vision block and run it and the later "
                            "blocks on the kept tokens only (negative counts from the end; "
                            "Qwen2.5-VL: a full-attention block); default: the last block's "
                            "input, every block on every patch (docs/vlm.md)")
    group.add_argument("--mmr_lambda", type=float, default=MMR_LAMBDA,
                       help="mmr's weight of relevance against redundancy, in [0, 1] (default "
                            "%(default)s)")
    group.add_argument("--alpha", type=float, default=0.5,
                       help="importance weight against diversity, in [0, 1] (default "
                            "%(default)s)")
    group.add_argument("--score_norm", choices=SCORE_NORMS, default="none",
                       help="'none' (default) or 'minmax'")
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="'auto' (Triton on CUDA, else PyTorch; default), 'triton' or "
                            "'reference'")


def add_lmms_sweep_arguments(parser):
    parser.add_argument("--model", default="tokenprune_llava_hf",
                        help="tokenprune's lmms-eval model (default %(default)s)")
    parser.add_argument("--model_args", required=True,
                        help="lmms-eval's --model_args for the base model, without pruning "
                             "arguments, e.g. pretrained=llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--tasks", required=True, help="lmms-eval tasks, e.g. mme,pope")
    parser.add_argument("--setting", action="append", required=True, metavar="ARGS",
                        help="pruning arguments of one run, e.g. k_anchors=8,top_m=56 or "
                             "ratio=0.25,selection=cls; repeat the flag for each setting")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="prompts per generate call (default %(default)s)")
    parser.add_argument("--out", default="lmms_sweep",
                        help="output folder (default %(default)s); its finished runs are kept")


def build_parser():
    """The light parser: every subcommand and flag, nothing imported. Subcommand parsers are
    reachable as `parser.subcommands[name]`."""
    parser = OneLineParser(prog=PROG, description="Training-free visual token pruning for Vision "
                                            "Transformers (OpenCLIP, timm, Hugging Face) and "
                                            "LLaVA. Flags take hyphens or underscores.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    evaluate = commands.add_parser(
        "eval", help="CLIP_benchmark's zero-shot evaluation, plus the pruning flags "
                     "(`tokenprune eval --help` lists them all)",
        description="CLIP_benchmark's eval plus the pruning flags. Flags take hyphens or "
                    "underscores.")
    clip_benchmark_flags.add_eval_flags(evaluate)
    add_pruning_arguments(evaluate)
    add_tokenizer_argument(evaluate)
    add_verbose_argument(evaluate)
    evaluate.set_defaults(which="eval")

    sweep = commands.add_parser(
        "sweep", help="evaluate a grid of pruning settings (and controls) in one pass",
        description="Zero-shot accuracy of every combination of the pruning lists, plus the "
                    "random and cls controls, in one pass over the dataset. Takes every flag of "
                    "eval. Writes results.csv, results.json, accuracy_vs_tokens.png and "
                    "summary.md.")
    clip_benchmark_flags.add_eval_flags(sweep, shown=clip_benchmark_flags.SWEEP_FLAGS)
    add_sweep_arguments(sweep)
    add_tokenizer_argument(sweep)
    add_verbose_argument(sweep)
    sweep.set_defaults(which="sweep")

    build = commands.add_parser(
        "build", help="collect results JSON files into one CSV",
        description="One CSV row per results JSON file of `tokenprune eval` (or CLIP_benchmark); "
                    "nested fields such as `pruning` are JSON text, non-finite numbers empty.")
    build.add_argument("files", nargs="+", help="results JSON files, or folders of them")
    build.add_argument("--output", default="benchmark.csv", help="CSV file (default %(default)s)")
    build.set_defaults(which="build")

    visualize = commands.add_parser(
        "visualize", help="draw an image with its anchor, kept and pruned patches",
        description="Draw an image with the anchors and the kept patches marked and the pruned "
                    "ones dimmed. With no arguments: a held-out canvas and the small ViT trained "
                    "on scikit-learn's digits that ships with tokenprune, offline. --model "
                    "ViT-B-16 (no --pretrained): random weights, seeded, on the sample image. "
                    "--schedule: one panel per stage.")
    add_visualize_arguments(visualize)
    visualize.set_defaults(which="visualize")

    generate = commands.add_parser(
        "generate", help="answer a prompt about images with a LLaVA model that sees fewer "
                         "image tokens",
        description="Answer --prompt about each --image (one batch) with a LLaVA model whose "
                    "language model receives k_anchors + top_m image tokens per image; prints "
                    "each answer, the image tokens per image before and after, and the time to "
                    "the first token. --compare runs the unpruned model too. Works offline on a "
                    "saved folder.")
    add_generate_arguments(generate)
    generate.set_defaults(which="generate")

    lmms_sweep = commands.add_parser(
        "lmms-sweep", help="answer quality in lmms-eval: the unpruned model and pruning "
                           "settings on the same tasks, one table and one plot",
        description="Runs lmms-eval (pip install \"tokenprune[lmms]\") on --tasks with the "
                    "unpruned model, then with each --setting; writes summary.md, results.csv, "
                    "results.json and score_vs_image_tokens.png into --out. Settings already "
                    "run there are not run again. Arguments after -- go to lmms-eval as they "
                    "are (e.g. -- --limit 100 --include_path DIR).")
    add_lmms_sweep_arguments(lmms_sweep)
    lmms_sweep.set_defaults(which="lmms-sweep")

    parser.subcommands = commands.choices
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


def _run(which, args, argv):
    if which == "eval":
        prune_config(args)  # before anything is imported: bad values are answered at once
        check_run_flags(args)
        check_datasets(args)
        shipped = check_shipped(args, argv)
        check_eval_output(args)
        workers = webdataset_workers(args)
        from .evaluate import parse_eval_args, run_eval
        eval_args = parse_eval_args(argv)
        eval_args.num_workers = workers
        if shipped:
            eval_args.pretrained = args.pretrained
        run_eval(eval_args)
    elif which == "sweep":
        sweep_lists(args)  # bad values are answered before anything is imported
        check_run_flags(args)
        check_datasets(args)
        check_shipped(args, argv)
        check_sweep_output(args)
        args.num_workers = webdataset_workers(args)
        from .sweep import run_sweep
        run_sweep(args)
    elif which == "generate":
        from .generate import check_generate_args, run_generate
        check_generate_args(args)  # no torch yet: bad values and missing files are said at once
        run_generate(args)
    elif which == "lmms-sweep":
        from .lmms_sweep import check_lmms_sweep_args, run_lmms_sweep
        check_lmms_sweep_args(args)
        run_lmms_sweep(args)
    elif which == "visualize":
        use_shipped_model(args)
        prune_config(args)
        check_image_output("--out", args.out)
        from .visualize import run_visualize
        run_visualize(args)
    else:
        from .build import build_csv
        rows = build_csv(args.files, args.output)
        print(f"wrote {args.output} ({rows} rows)")


def main(argv=None):
    """Run the command line; returns the exit status (argument errors raise SystemExit(2))."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # The subcommand is the first word that is not a flag (the top level has no other flags).
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    lmms_args = []  # lmms-sweep hands what follows -- to lmms-eval
    if command == "lmms-sweep" and "--" in argv:
        cut = argv.index("--")
        argv, lmms_args = argv[:cut], argv[cut + 1:]
    if command in parser.subcommands:
        argv = accept_hyphens(argv, _option_strings(parser.subcommands[command]))
    args, extras = parser.parse_known_args(argv)
    args.lmms_args = lmms_args
    which = getattr(args, "which", None)
    if which is None:
        parser.print_help()
        return 0
    subparser = parser.subcommands[which]
    # A clip-benchmark other than the one our copy of its flags came from may know more flags:
    # there, CLIP_benchmark's own parser judges them.
    if extras and not (which == "eval" and not clip_benchmark_flags.flags_trusted()):
        subparser.error(unrecognized(extras, subparser))
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        _run(which, args, argv)
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

