"""What a --model and its --pretrained are, checked before the model loads: from the model's
config alone (no torch, no weights: an unknown name, a ResNet tower, --layer or --schedule
outside the tower, a checkpoint file that is not there), then, with open_clip imported but
before any download, its pretrained tags, a tower that cannot be pruned, and its Hugging Face
text tokenizer. open_clip is imported only inside the functions that say so."""
import difflib
import json
import os
import sys
from itertools import product

from ..config import PruneConfig
from .checks import as_list
from .common import CLIError
from .flags import schedule_text
from .shipped_rules import SHIPPED_MODELS, shipped_card

# What --pretrained takes besides a tag: a checkpoint file. A tag never has a path separator or
# one of these endings, so a value with either names a file.
CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def _openclip_config_folder():
    """open_clip's model_configs folder, found without importing open_clip (10 s or more)."""
    from importlib.util import find_spec
    try:
        return os.path.join(os.path.dirname(find_spec("open_clip").origin), "model_configs")
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def known_openclip_models():
    """The OpenCLIP architecture names: open_clip.list_models() once open_clip is imported (it
    also knows the configs added at run time with add_model_config), else its config files."""
    if "open_clip" in sys.modules:
        import open_clip
        return list(open_clip.list_models())
    folder = _openclip_config_folder()
    try:
        return sorted(name[:-len(".json")] for name in os.listdir(folder)
                      if name.endswith(".json"))
    except (OSError, TypeError):
        return []


def openclip_config(model_name):
    """The config of an OpenCLIP --model without a schema, as open_clip.get_model_config gives
    it, read from its file when open_clip is not imported yet; None for a name OpenCLIP does
    not know."""
    name = model_name.replace("/", "-")
    if "open_clip" in sys.modules:
        import open_clip
        return open_clip.get_model_config(name)
    folder = _openclip_config_folder()
    if folder is None or name not in known_openclip_models():
        return None
    try:
        with open(os.path.join(folder, f"{name}.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def unknown_model_message(model_name):
    close = difflib.get_close_matches(model_name.replace("/", "-"), known_openclip_models(), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (f"unknown model {model_name!r}: not an OpenCLIP architecture.{hint} List them with "
            "`python -c \"import open_clip; print(open_clip.list_models())\"`, or use "
            "--model local-dir:/path/to/folder")


def check_model_config(model_name, pruning_flag=None):
    """What --model's config says, before anything is imported or loaded: an unknown name, a
    local-dir: folder without its config and (when `pruning_flag` names the flag that asked for
    pruning, or is "" when pruning is implied) a ResNet tower are CLIErrors. Returns the image
    tower's number of blocks where the config gives it (a shipped model, an OpenCLIP ViT), else
    None (hf-hub:, a timm tower: known once built). check_model checks the rest once open_clip
    is imported (pretrained tags, timm towers)."""
    if model_name in SHIPPED_MODELS:
        return shipped_card(model_name)["arch"]["layers"]
    if model_name.startswith("hf-hub:"):
        return None
    if model_name.startswith("local-dir:"):
        folder = model_name[len("local-dir:"):]
        try:
            with open(os.path.join(folder, "open_clip_config.json"), encoding="utf-8") as f:
                config = json.load(f).get("model_cfg") or {}
        except OSError:
            raise CLIError(f"--model {model_name}: no open_clip_config.json in {folder!r}") \
                from None
        except (ValueError, AttributeError):
            return None  # OpenCLIP says what is wrong with it
    else:
        config = openclip_config(model_name)
        if config is None:
            raise CLIError(unknown_model_message(model_name))
    vision = config.get("vision_cfg") or {}
    layers = vision.get("layers")
    if pruning_flag is not None and isinstance(layers, (list, tuple)):
        raise CLIError(f"{pruning_flag or '--model ' + model_name}: {model_name} has a ResNet "
                       "image tower, which cannot be pruned; tokenprune prunes the Vision "
                       "Transformer towers of docs/towers.md")
    if vision.get("timm_model_name") or isinstance(layers, bool) or not isinstance(layers, int):
        return None
    return layers


def blocks_problem(schedule, layer, depth):
    """Why --schedule (its stages as given: a one-stage schedule too, which PruneConfig makes a
    single cut) or --layer does not fit a `depth`-block tower, worded as PruneConfig's
    block_indices words it; None when it fits."""
    if schedule:
        for number, stage in enumerate(schedule, 1):
            if not -depth <= stage[0] < depth:
                return (f"schedule stage {number} layer must be in [{-depth}, {depth - 1}] for "
                        f"this {depth}-block tower, got {stage[0]}")
        try:
            PruneConfig(schedule=schedule).block_indices(depth)
        except ValueError as err:  # stages whose signs differ, out of order in this tower
            return str(err)
        return None
    if not -depth <= layer < depth:
        return f"layer must be in [{-depth}, {depth - 1}] for this {depth}-block tower, got {layer}"
    return None


def check_blocks(args, depth):
    """eval's and visualize's --layer or --schedule against a `depth`-block tower (None: not
    known yet, nothing checked); a CLIError names the flag, the stage and the range."""
    problem = None if depth is None else blocks_problem(getattr(args, "schedule", None),
                                                         args.layer, depth)
    if problem:
        raise CLIError(f"--{problem}")


def check_sweep_blocks(lists, depth, model):
    """sweep's --layer values and --schedule values exist in the `depth`-block tower, in order."""
    for layer in lists["layer"]:
        if not -depth <= layer < depth:
            raise CLIError(f"--layer must be in [{-depth}, {depth - 1}] for {model}'s "
                           f"{depth}-block image tower, got {layer}")
    for schedule in lists["schedule"]:
        problem = blocks_problem(schedule, None, depth)
        if problem:
            raise CLIError(f"--schedule {schedule_text(schedule)}: {problem}")


def _looks_like_a_file(pretrained):
    return (os.sep in pretrained or "/" in pretrained or pretrained.startswith("~")
            or pretrained.lower().endswith(CHECKPOINT_EXTENSIONS))


def check_pretrained_files(values):
    """--pretrained values that name a file (a path separator, ~, or a checkpoint's ending): the
    file is there and is a file; before anything is imported, and before the results file's
    name is made from it. A plain name may be a tag: check_model judges it."""
    for pretrained in values:
        if not pretrained or not _looks_like_a_file(pretrained):
            continue
        path = os.path.expanduser(pretrained)
        if os.path.isdir(path):
            raise CLIError(folder_not_checkpoint_message(pretrained))
        if not os.path.isfile(path):
            raise CLIError(f"--pretrained {pretrained}: no such checkpoint file (give a file "
                           "that exists, or a pretrained tag of the model, such as openai)")


def folder_not_checkpoint_message(pretrained):
    return (f"--pretrained {pretrained}: a folder, not a checkpoint file; give the weights file "
            f"in it (e.g. --pretrained {os.path.join(pretrained, 'open_clip_pytorch_model.bin')}"
            f"), or, for a folder that holds open_clip_config.json and the weights, --model "
            f"local-dir:{pretrained}")


def check_pretrained_folders(args):
    """A --pretrained that is a folder named like a word (no path separator): a pretrained tag
    wins over a folder in OpenCLIP, and only OpenCLIP's tags tell which it is, so open_clip is
    imported for it here, before CLIP_benchmark starts its run and prints its plan."""
    if any(os.path.isdir(pretrained) for pretrained in as_list(args.pretrained)):
        for model, pretrained in product(as_list(args.model), as_list(args.pretrained)):
            if model not in SHIPPED_MODELS:
                check_model(model, pretrained)


def pretrained_hint(model_name):
    """How to give `model_name` trained weights: its own OpenCLIP pretrained tags, or a file."""
    from open_clip.pretrained import list_pretrained_tags_by_model
    tags = list_pretrained_tags_by_model(model_name.replace("/", "-"))
    if not tags:
        return "--pretrained /path/to/checkpoint.bin"
    tag = "openai" if "openai" in tags else tags[0]
    others = f"; its tags: {', '.join(tags)}" if len(tags) > 1 else ""
    return f"--pretrained {tag} (downloads once{others}) or --pretrained /path/to/checkpoint.bin"


def hub_tokenizer(model_name):
    """The Hugging Face hub id OpenCLIP loads `model_name`'s text tokenizer from (its config's
    text_cfg.hf_tokenizer_name), or None: OpenCLIP's own tokenizer, or a model folder or hub
    repository that brings its tokenizer along."""
    import open_clip
    from open_clip.factory import parse_model_name
    schema, _ = parse_model_name(model_name)
    if schema is not None:
        return None
    config = open_clip.get_model_config(model_name.replace("/", "-")) or {}
    return config.get("text_cfg", {}).get("hf_tokenizer_name") or None


def tokenizer_cached(hub_id):
    """Whether the Hugging Face cache (HF_HOME) holds the tokenizer `hub_id`."""
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(hub_id, "tokenizer_config.json"), str)


def missing_tokenizer_message(model_name, hub_id, cause=None):
    why = f" ({cause})" if cause else ""
    return (f"the text tokenizer of {model_name} is missing: OpenCLIP loads it from the Hugging "
            f"Face hub as {hub_id}{why}, which cannot be reached from here (HF_HUB_OFFLINE=1 or "
            "no network), and the Hugging Face cache does not hold it. Where downloads work, "
            f"either fill a cache (python -c \"from transformers import AutoTokenizer; "
            f"AutoTokenizer.from_pretrained('{hub_id}')\") and point HF_HOME at a copy of it "
            f"here, or save the tokenizer to a folder (AutoTokenizer.from_pretrained('{hub_id}')"
            ".save_pretrained('DIR')), copy it here and pass --tokenizer DIR")


def check_tokenizer(model_name, tokenizer_dir):
    """Before the model loads: --tokenizer DIR fits the model, or the model's hub tokenizer can
    be had (checked in the cache when the hub is switched off; a failure to reach it otherwise
    is translated by loading_errors)."""
    hub_id = hub_tokenizer(model_name)
    if tokenizer_dir is not None:
        if hub_id is None:
            raise CLIError(f"--tokenizer {tokenizer_dir}: {model_name} does not load its "
                           "tokenizer from the Hugging Face hub (it brings its own); leave "
                           "--tokenizer out")
        if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
            raise CLIError(f"--tokenizer {tokenizer_dir}: no tokenizer_config.json there; give "
                           "a folder written by the tokenizer's save_pretrained (the tokenizer "
                           f"of {model_name} is {hub_id} on the Hugging Face hub)")
        return
    if hub_id is None:
        return
    import huggingface_hub.constants
    if huggingface_hub.constants.HF_HUB_OFFLINE and not tokenizer_cached(hub_id):
        raise CLIError(missing_tokenizer_message(model_name, hub_id))


def check_model(model_name, pretrained, pruning_flag=None):
    """Fail early, before any download, on an unknown architecture or pretrained tag, and (when
    `pruning_flag` names the flag that asked for pruning, or is "" when pruning is implied) on
    a tower that cannot be pruned. Names with a schema (hf-hub:, local-dir:) are left to
    OpenCLIP."""
    import open_clip
    from open_clip.factory import parse_model_name

    try:
        schema, identifier = parse_model_name(model_name)
    except ValueError as err:
        raise CLIError(f"--model {model_name}: {err}") from err
    if schema == "local-dir":
        if not os.path.isfile(os.path.join(identifier, "open_clip_config.json")):
            raise CLIError(f"--model {model_name}: no open_clip_config.json in {identifier!r}")
        return
    if schema is not None:
        return
    name = model_name.replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        raise CLIError(unknown_model_message(model_name))
    if pretrained and not os.path.isfile(pretrained):
        from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
        if not get_pretrained_cfg(name, pretrained):
            if os.path.isdir(pretrained):  # not a tag of this model, so meant as a file
                raise CLIError(folder_not_checkpoint_message(pretrained))
            if os.sep in pretrained or os.path.splitext(pretrained)[1]:
                raise CLIError(f"--pretrained {pretrained}: no such checkpoint file (give a "
                               "file that exists, or a pretrained tag of the model, such as "
                               "openai)")
            tags = ", ".join(list_pretrained_tags_by_model(name)) or "none"
            raise CLIError(f"unknown pretrained tag {pretrained!r} for {model_name} (known tags: "
                           f"{tags}); a local checkpoint file also works: --pretrained PATH")
    if pruning_flag is not None:
        from ..towers import refused_by_config, supported
        tower = refused_by_config(config.get("vision_cfg", {}))
        if tower:
            raise CLIError(f"{pruning_flag or '--model ' + model_name}: {model_name} has {tower}, "
                           f"which cannot be pruned; tokenprune supports OpenCLIP models whose "
                           f"image tower is one of: {supported()}")
