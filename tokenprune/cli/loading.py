"""Loading diagnosis: what failed while a model loaded, said in one line that says what to do,
classified by the step that failed (download, reading the checkpoint, loading it into the
model, the text tokenizer), never by the words of an error message; a torch and torchvision
whose builds do not match; and the third-party warnings that an ordinary run triggers and that
need no action.

Nothing heavy is imported at the top: open_clip only inside `loading_errors`.
"""
import functools
import logging
import re
import warnings
from contextlib import contextmanager

from .common import DEBUG_ENV, CLIError
from .model_checks import missing_tokenizer_message
from .swap import swapped


# ----- loading failures, classified by the step that failed ---------------------------------

class _StepFailed(Exception):
    """Raised, from the original error, by the OpenCLIP step that failed (see loading_errors).
    OpenCLIP re-raises some errors as its own; the step is found again on the chain."""

    def __init__(self, step, cause, detail=None):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.step = step
        self.detail = detail


def _failed_step(err):
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, _StepFailed):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _step(name, function, diagnose=None):
    """`function`, except that its failure is a _StepFailed(name) raised from the error."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except _StepFailed:
            raise
        except Exception as err:  # noqa: BLE001 - tagged and re-raised, not swallowed
            detail = diagnose(*args, **kwargs) if diagnose else None
            raise _StepFailed(name, err, detail) from err
    return wrapped


def checkpoint_mismatch(model, checkpoint_path, *args, **kwargs):
    """(missing, unexpected, wrong_shape) between `model` and the checkpoint, after OpenCLIP's
    own conversions; wrong_shape holds (key, checkpoint shape, model shape). None when it cannot
    be worked out (then the original error is all there is)."""
    from open_clip import factory
    try:
        state = factory.load_state_dict(checkpoint_path)
        state = factory.convert_state_dict(model, state)
        factory.resize_pos_embed(state, model)
        factory.resize_text_pos_embed(state, model)
    except Exception:  # noqa: BLE001 - a diagnosis of a failure, best effort
        return None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [(key, tuple(state[key].shape), tuple(own[key].shape))
                   for key in own if key in state and hasattr(state[key], "shape")
                   and tuple(state[key].shape) != tuple(own[key].shape)]
    return missing, unexpected, wrong_shape


def _some(keys, count=3):
    shown = ", ".join(keys[:count])
    return shown + (f" and {len(keys) - count} more" if len(keys) > count else "")


def _mismatch_message(model_name, pretrained, mismatch):
    missing, unexpected, wrong_shape = mismatch
    examples = []
    if missing:
        examples.append(f"missing: {_some(missing)}")
    if unexpected:
        examples.append(f"unexpected: {_some(unexpected)}")
    if wrong_shape:
        shapes = [f"{key} is {list(theirs)} in the file, {list(ours)} in the model"
                  for key, theirs, ours in wrong_shape]
        examples.append(f"wrong shape: {_some(shapes, 2)}")
    return (f"--pretrained {pretrained} does not fit --model {model_name}: {len(missing)} "
            f"missing, {len(unexpected)} unexpected and {len(wrong_shape)} wrong-shape weights "
            f"({'; '.join(examples)}). Most likely it is a checkpoint of another architecture: "
            "pass the --model it was trained as")


class _DropLog(logging.Filter):
    """Drops OpenCLIP log records that our own messages repeat."""

    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record):
        return not str(record.msg).startswith(self.prefixes)


@contextmanager
def loading_errors(model_name, pretrained, random_weights_noted=False, tokenizer_dir=None):
    """Turn OpenCLIP's loading failures into one-line CLIErrors that say what failed and what to
    do, classified by the step that failed (download, reading the checkpoint file, loading it
    into the model, loading the text tokenizer), never by the words of an error message.

    OpenCLIP logs a download failure before raising it: our error says it, so that log is
    dropped, as is its random-weights warning when the caller has already printed a note.
    With `tokenizer_dir` (--tokenizer), OpenCLIP's Hugging Face tokenizer is read from there
    instead of the hub."""
    from open_clip import factory

    hf_tokenizer = factory.HFTokenizer

    def make_tokenizer(source, *args, **kwargs):
        return hf_tokenizer(tokenizer_dir or source, *args, **kwargs)

    prefixes = ("Failed to download weights", "Pretrained tag or path")
    log_filter = _DropLog(prefixes + (("No pretrained weights loaded",)
                                      if random_weights_noted else ()))
    steps = {"download_pretrained": _step("download", factory.download_pretrained),
             "download_pretrained_from_hf": _step("download",
                                                  factory.download_pretrained_from_hf),
             "load_state_dict": _step("read", factory.load_state_dict),
             "load_checkpoint": _step("load", factory.load_checkpoint, checkpoint_mismatch),
             "HFTokenizer": _step("tokenizer", make_tokenizer,
                                  lambda source, *args, **kwargs: (source, tokenizer_dir))}
    logging.getLogger().addFilter(log_filter)
    try:
        with swapped([(factory, name, step) for name, step in steps.items()]):
            yield
    except CLIError:
        raise
    except Exception as err:  # noqa: BLE001 - translated, not swallowed
        raise CLIError(loading_error_message(err, model_name, pretrained)) from err
    finally:
        logging.getLogger().removeFilter(log_filter)


def loading_error_message(err, model_name, pretrained):
    """The one-line message for `err`, raised while loading inside `loading_errors`: what
    failed is read from the step that raised it (see _step), not from the message's words."""
    mismatch = torchvision_mismatch_message(err)
    if mismatch:
        return mismatch
    failed = _failed_step(err)
    step = failed.step if failed else None
    cause = failed.__cause__ if failed else err
    what = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
    if step == "download":
        return (f"could not download the pretrained weights {pretrained!r} for {model_name} "
                f"({type(cause).__name__}; {DEBUG_ENV}=1 shows why). Without internet access, "
                "run once where downloads work, or fetch the checkpoint elsewhere and pass the "
                "file: --pretrained /path/to/open_clip_pytorch_model.bin (set HF_HUB_OFFLINE=1 "
                "to skip the download retries)")
    if step == "read":
        return (f"--pretrained {pretrained}: not a readable checkpoint file "
                f"({type(cause).__name__} while reading it). Expected a state_dict saved with "
                "torch.save, a .safetensors file or an OpenCLIP .bin; is the file complete?")
    if step == "tokenizer":
        hub_id, tokenizer_dir = failed.detail
        if tokenizer_dir:
            return (f"--tokenizer {tokenizer_dir}: could not load the tokenizer of {model_name} "
                    f"from it ({what}); give a folder written by save_pretrained of {hub_id}")
        return missing_tokenizer_message(model_name, hub_id, type(cause).__name__)
    if step == "load" and failed.detail and any(failed.detail):
        return _mismatch_message(model_name, pretrained, failed.detail)
    return (f"could not load model {model_name!r} with pretrained {pretrained!r}: {what} "
            f"(set {DEBUG_ENV}=1 for the traceback)")


# ----- torch and torchvision builds that do not match ----------------------------------------

# What `import torchvision` raises (a RuntimeError from torch's operator registry) when its
# compiled operators were built for another torch: open_clip and transformers' image code
# import torchvision, so every command fails there.
MISSING_OPERATOR = re.compile(r"operator torchvision::\w+ does not exist")


def installed_version(name):
    """The installed version of distribution `name`, read from its metadata (importing it is
    what fails); None when it is not installed."""
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torchvision_mismatch_message(err):
    """The one-line message for a torchvision whose build does not match torch, when `err` (or
    an error it was raised from) is the missing-operator error; else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RuntimeError) and MISSING_OPERATOR.search(str(err)):
            break
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    else:
        return None
    torch_version = installed_version("torch") or "(not installed)"
    vision = installed_version("torchvision") or "(not installed)"
    release, _, build = torch_version.partition("+")
    pip = f"torch=={release}"
    # PyTorch's compatibility table: torch 2.x pairs with torchvision 0.(x + 15).
    two = re.match(r"2\.(\d+)\.", release)
    if two:
        pip += f' "torchvision==0.{int(two.group(1)) + 15}.*"'
    else:
        pip += " torchvision (the release made for it)"
    if build:  # a build from PyTorch's own index (+cpu, +cu128, +rocm6.2): the same one
        pip += f" --index-url https://download.pytorch.org/whl/{build}"
    first = (str(err).strip().splitlines() or [""])[0]
    return (f"torch {torch_version} and torchvision {vision} are builds that do not match "
            f"(torchvision's compiled operators do not load: {first}); reinstall the two "
            f"together, from one index: pip install --force-reinstall {pip}")


# ----- third-party warnings known to be harmless here ---------------------------------------

@contextmanager
def quiet_warnings(show=False):
    """Hide the third-party warnings that an ordinary run triggers and that need no action;
    `show` (the --verbose flag) keeps them all."""
    with warnings.catch_warnings():
        if show:
            yield
            return
        # CLIP_benchmark builds its WebDataset without shardshuffle; it reads shards in order.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"webdataset\.",
                                message=r"WebDataset\(shardshuffle=\.\.\.\) is None")
        try:
            from sklearn.exceptions import UndefinedMetricWarning
        except ImportError:
            pass
        else:
            # Precision of a class never predicted, in CLIP_benchmark's classification report.
            warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
        yield
