"""The shipped small ViTs (tokenprune/proxy.py) as the commands name them, and their rules,
checked before anything loads: `eval` and `sweep` run a shipped model on the held-out canvases
of its own regime only, with its own weights; `visualize` runs the small one when given no
model. Read without importing torch: a shipped model's card is a JSON file beside its weights.
tokenprune/cli/shipped.py makes them CLIP_benchmark's model and dataset once a run starts.
"""
import difflib
import json
from itertools import product

from .checks import as_list, flag_given
from .common import CLIError
from .flags import PRUNING_DEFAULTS

# The shipped ViTs and their held-out canvases as `eval` and `sweep` name them (the values are
# tokenprune.proxy's REGIMES).
SHIPPED_PREFIX = "tokenprune:"
SHIPPED_MODELS = {"tokenprune:proxy-vit": "small", "tokenprune:proxy-vit-large": "large"}
SHIPPED_DATASETS = {"tokenprune:digits": "small", "tokenprune:digits-large": "large"}
SHIPPED_PRETRAINED = "shipped"  # the --pretrained a shipped model runs with: its own weights
DEMO_MODEL = "tokenprune:proxy-vit"  # what `tokenprune visualize` runs without --model
# `tokenprune visualize`'s k and m for the small ViT shipped with the package: 16 of its 64
# patches kept, as 60 of ViT-B/16's 196 are with PruneConfig's defaults.
SHIPPED_MODEL_PRUNING = {"k_anchors": 4, "top_m": 12}
# The JSON card beside each shipped checkpoint, by regime (tokenprune.proxy.REGIMES names the
# same files, but importing tokenprune.proxy imports torch); its "arch" is the tower's shape.
SHIPPED_CARDS = {"small": "proxy_vit.json", "large": "proxy_vit_large.json"}


def shipped_card(model_name):
    """The card of a shipped model (SHIPPED_MODELS), read without importing torch."""
    from importlib import resources
    card = resources.files("tokenprune").joinpath("assets",
                                                   SHIPPED_CARDS[SHIPPED_MODELS[model_name]])
    return json.loads(card.read_text(encoding="utf-8"))


def _check_shipped_name(model):
    """A --model with the shipped prefix names a shipped model; else the closest is offered."""
    if model not in SHIPPED_MODELS:
        close = difflib.get_close_matches(model, SHIPPED_MODELS, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise CLIError(f"unknown model {model!r}: the shipped models are "
                       f"{' and '.join(SHIPPED_MODELS)}.{hint}")


def _shipped_name(names, regime):
    """The shipped model or dataset (in `names`) of a regime."""
    return next(name for name, its_regime in names.items() if its_regime == regime)


def check_shipped(args, argv):
    """eval's and sweep's use of the shipped models and datasets (tokenprune:...), before
    anything loads: a shipped model runs on the canvases of its own regime only, with its own
    weights, and they on it only. For shipped models, sets --pretrained to SHIPPED_PRETRAINED and
    returns True."""
    models, datasets = as_list(args.model), as_list(args.dataset)
    shipped = [model for model in models if model.startswith(SHIPPED_PREFIX)]
    for model in shipped:
        _check_shipped_name(model)
    digits = [dataset for dataset in datasets if dataset in SHIPPED_DATASETS]
    if not shipped:
        if digits:
            raise CLIError(f"--dataset {digits[0]}: the shipped digit canvases are read by the "
                           f"shipped models only; use --model {' or '.join(SHIPPED_MODELS)}")
        return False
    if len(shipped) < len(models):
        raise CLIError(f"--model {' '.join(models)}: give the shipped models ({', '.join(shipped)}) "
                       "in a run of their own: they take no --pretrained, the others do")
    if flag_given(argv, "--pretrained"):
        raise CLIError(f"--pretrained {' '.join(as_list(args.pretrained))}: {shipped[0]} brings "
                       "its own trained weights (in tokenprune/assets/); leave --pretrained out")
    others = [dataset for dataset in datasets if dataset not in SHIPPED_DATASETS]
    if others:
        raise CLIError(f"--dataset {others[0]}: the shipped models read only their digit "
                       f"canvases; use --dataset {' or '.join(SHIPPED_DATASETS)}")
    # Each shipped model reads the canvases of its own regime: the other regime's digits are a
    # task it was never trained on (4% acc1 for the small model on the large digits).
    for model, dataset in product(shipped, datasets):
        if SHIPPED_MODELS[model] != SHIPPED_DATASETS[dataset]:
            own = _shipped_name(SHIPPED_DATASETS, SHIPPED_MODELS[model])
            reader = _shipped_name(SHIPPED_MODELS, SHIPPED_DATASETS[dataset])
            raise CLIError(f"--dataset {dataset}: {model} was trained on the "
                           f"{SHIPPED_MODELS[model]}-digit canvases, {own}; {dataset} holds the "
                           f"{SHIPPED_DATASETS[dataset]}-digit ones, which {reader} reads. Use "
                           f"--dataset {own}, or --model {reader}")
    if args.task not in ("auto", "zeroshot_classification"):
        raise CLIError(f"--task {args.task}: the shipped models and canvases run zero-shot "
                       "classification only (--task auto or zeroshot_classification)")
    if args.split != "test":
        raise CLIError(f"--split {args.split}: the shipped canvases have a test split only (the "
                       "held-out canvases its card's accuracy was measured on)")
    args.pretrained = [SHIPPED_PRETRAINED] if isinstance(args.pretrained, list) \
        else SHIPPED_PRETRAINED
    return True


def use_shipped_model(args):
    """`tokenprune visualize`: True when it runs a ViT shipped with the package: the small one
    with no --model, --image or --pretrained, or the one --model names (SHIPPED_MODELS), which
    takes neither --image nor --pretrained. Fills in --model and the unset k, m and selection
    for the model that runs, and `compare_selections`: whether the picture shows the three
    selections side by side (a shipped model with no --selection and no --schedule); calling
    it again changes nothing."""
    if args.model is not None and args.model.startswith(SHIPPED_PREFIX):
        _check_shipped_name(args.model)
        if args.image is not None:
            raise CLIError(f"--image {args.image}: {args.model} reads its own held-out digit "
                           "canvases only; leave --image out, or give an OpenCLIP --model")
        if args.pretrained is not None:
            raise CLIError(f"--pretrained {args.pretrained}: {args.model} brings its own trained "
                           "weights (in tokenprune/assets/); leave --pretrained out")
    shipped = args.model in SHIPPED_MODELS or (
        args.model is None and args.image is None and args.pretrained is None)
    schedule = bool(getattr(args, "schedule", None))  # its stages give k and m: one selection
    if not hasattr(args, "compare_selections"):
        args.compare_selections = shipped and args.selection is None and not schedule
    if args.selection is None:
        args.selection = PRUNING_DEFAULTS["selection"]
    for name, value in SHIPPED_MODEL_PRUNING.items():
        if getattr(args, name) is None:
            setattr(args, name, value if shipped and not schedule else PRUNING_DEFAULTS[name])
    if args.model is None and not shipped:
        args.model = "ViT-B-16"
    return shipped
