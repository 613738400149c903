"""tokenprune's models for lmms-eval, the harness that vision-language pruning papers report with.

lmms-eval (0.6 and later) loads plugin models from the entry-point group `lmms_eval.models`;
setup.py registers `manifests` there, so after `pip install "tokenprune[lmms]"`:

    python -m lmms_eval --model tokenprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,k_anchors=8,ratio=0.25 ...

Each model is lmms-eval's own model for that base (every one of its model arguments passes
through unchanged), with `tokenprune.prune_image_tokens` applied to its model and processor once
they are loaded, and batches that really run batched. The pruning arguments (PRUNING_ARGUMENTS)
are checked before any model loads, and so is every other name, against the base's own
(declared_arguments): a misspelt one is refused in one line. Without them nothing is pruned.
docs/lmms-eval.md has the details: which base each model wraps, where the results record the
pruning, what was tested.

This module imports nothing heavy: lmms-eval reads the entry point each time it starts.
"""
from numbers import Integral, Real

from ..config import IMAGE_TOKEN_ARGUMENTS
from ..vlm.families import FAMILIES

# name -> the kind of value ("int", "float", "str"): prune_image_tokens' own arguments, as
# `tokenprune generate` takes them too (tokenprune.config.IMAGE_TOKEN_ARGUMENTS).
PRUNING_ARGUMENTS = {name: kind.__name__ for name, kind in IMAGE_TOKEN_ARGUMENTS.items()}

# model id -> (the lmms-eval model it wraps, our class), from tokenprune/vlm/families.py. Each
# wraps the implementation that lmms-eval runs for the base's name: the chat one where the base
# has one, else the simple one (SIMPLE).
MODELS = {f"tokenprune_{family.lmms_model}": (family.lmms_model, family.lmms_class)
          for family in FAMILIES.values() if family.lmms_model is not None}
SIMPLE = {f"tokenprune_{family.lmms_model}" for family in FAMILIES.values()
          if family.lmms_model is not None and not family.lmms_chat}


def manifests():
    """The `lmms_eval.models` entry point: one ModelManifest per model in MODELS."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return [ModelManifest(model_id=model_id, simple_class_path=class_path)
            if model_id in SIMPLE else ModelManifest(model_id=model_id, chat_class_path=class_path)
            for model_id, (_, class_path) in MODELS.items()]


class PruningArgumentError(SystemExit):
    """A bad pruning argument, as one line. A SystemExit, because lmms-eval's command line
    catches every Exception, prints a traceback and exits 0: this leaves with status 1."""

    def __init__(self, model_id, message):
        super().__init__(f"{model_id}: {message}")


def _as_int(model_id, name, value):
    # lmms-eval's parser gives "3" as the int 3 but "-1" as the float -1.0 (str.isnumeric is
    # False for it): an integral float is that integer, anything else is refused, never rounded.
    if isinstance(value, bool) or not isinstance(value, (Integral, Real)) or (
            not isinstance(value, Integral) and not float(value).is_integer()):
        raise PruningArgumentError(model_id, f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float(model_id, name, value):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PruningArgumentError(model_id, f"{name} must be a number, got {value!r}")
    return float(value)


def declared_arguments(base_class):
    """The model arguments an lmms-eval model class takes: the named parameters of its
    __init__. lmms-eval's models also take **kwargs, mostly only to assert that it is empty, so a
    name outside these fails there, after a traceback that the command line exits 0 from. Some
    hand **kwargs on to their parent's __init__ (qwen3_5 to qwen3_vl's), so the named parameters
    of every __init__ up the class order count, until one that takes no **kwargs."""
    import inspect
    names = []
    for cls in base_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]  # self
        names += [p.name for p in parameters if p.name not in names
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return tuple(names)


def _unknown_argument(model_id, name, base_arguments, ours):
    import difflib
    known = list(PRUNING_ARGUMENTS) + list(ours) + list(base_arguments)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    base = MODELS.get(model_id, (model_id,))[0]
    allowed = [f"the pruning arguments are {', '.join(PRUNING_ARGUMENTS)}"]
    if ours:
        allowed.append(f"ours {', '.join(ours)}")
    allowed.append(f"lmms-eval's {base}'s {', '.join(base_arguments)}")
    return PruningArgumentError(model_id, f"unknown model argument {name!r}{hint}; "
                                          f"{'; '.join(allowed)}")


def split_pruning_arguments(model_id, arguments, base_arguments=None, ours=()):
    """(pruning, base): the pruning arguments among `arguments`, parsed and checked as
    prune_image_tokens checks them, and the rest, for the base model. A bad one raises
    PruningArgumentError naming it, before anything is loaded. With `base_arguments` (the names
    the base model takes, declared_arguments) a name that is neither theirs, a pruning
    argument, nor one of `ours` (the names the wrapper takes itself, which its caller takes out
    first) is refused too, naming the allowed ones."""
    from ..config import image_token_config
    pruning, base = {}, {}
    for name, value in arguments.items():
        kind = PRUNING_ARGUMENTS.get(name)
        if kind is None:
            if base_arguments is not None and name not in base_arguments and name not in ours:
                raise _unknown_argument(model_id, name, base_arguments, ours)
            base[name] = value
        elif kind == "int":
            pruning[name] = _as_int(model_id, name, value)
        elif kind == "float":
            pruning[name] = _as_float(model_id, name, value)
        else:
            pruning[name] = str(value)
    try:  # layer's range needs the model's tower: prune_image_tokens checks it after loading
        image_token_config(**{k: v for k, v in pruning.items() if k != "layer"})
    except (TypeError, ValueError) as err:
        raise PruningArgumentError(model_id, str(err)) from None
    return pruning, base
