"""`tokenprune eval`: CLIP_benchmark's own evaluation, with the pruning applied to the model it
loads.

How it hooks in: `clip_benchmark.cli.main_eval` runs unchanged (its loop over models, datasets
and languages, the --distributed split, datasets, class names, templates, metrics and output
naming). While it runs, four names inside CLIP_benchmark are swapped, and put back afterwards:

- `clip_benchmark.cli.load_clip`: loads the model exactly as before (a shipped ViT,
  `tokenprune:...`, from shipped.py), then, with --enable_pruning, replaces one block with the
  pruned block (`replace_last_block`); in both modes it times `encode_image`, the
  image-encoding throughput that goes into the JSON.
- `clip_benchmark.cli.build_dataset`: unchanged (the shipped canvases, `tokenprune:digits...`,
  from shipped.py); its failures become one-line errors, and a local WebDataset gets a length
  (a progress bar with a total).
- `clip_benchmark.cli.json`: the `json` module, except that the results dump gets our fields
  (the pruning configuration, tokens before and after, throughput) next to CLIP_benchmark's,
  and a non-finite metric is written as null.
- `clip_benchmark.metrics.zeroshot_classification.accuracy`: see `accuracy` below (numpy 2.4).
"""
import argparse
import functools
import inspect
import json
import math
import os
import tarfile
import time
import types
import warnings
from contextlib import contextmanager

import torch
from clip_benchmark import cli as cb_cli
from clip_benchmark.metrics import zeroshot_classification

from ..patch import UnsupportedModelError, replace_last_block
from ..selection import resolve_backend
from ..towers import find_tower
from . import shipped
from .build import json_safe
from .checks import cpu_has_native_bfloat16
from .clip_benchmark_flags import AMP_HELP, DEFAULT_DATASET_ROOT
from .common import PROG, CLIError, OneLineParser, note
from .flags import PRUNING_DEFAULTS, add_tokenprune_eval_flags, prune_config
from .loading import loading_errors, quiet_warnings
from .model_checks import check_blocks, check_model, check_tokenizer
from .shipped_rules import SHIPPED_DATASETS, SHIPPED_MODELS
from .swap import swapped

NOOP_WARNING = r"k_anchors \+ top_m = \d+ >= \d+ patch tokens"
WDS_IMAGE_EXTENSIONS = (".webp", ".png", ".jpg", ".jpeg")  # what its WebDataset loader decodes


# ----- the command line: CLIP_benchmark's own parser, plus ours -----------------------------

def eval_parser():
    """CLIP_benchmark's own parser (subcommands `eval` and `build`), built by its own code, with
    what tokenprune adds to `eval` (flags.add_tokenprune_eval_flags: the pruning flags,
    --tokenizer, --verbose), as on the light parser.

    `clip_benchmark.cli.get_parser_args()` builds the parser and parses sys.argv in one go;
    we let it build with our parser class, whose parse_args is a no-op while capturing, and
    parse later.
    """
    class Capturing(OneLineParser):
        capturing = True

        def __init__(self, *args, prog=None, **kwargs):
            super().__init__(*args, prog=prog or PROG, **kwargs)

        def parse_args(self, args=None, namespace=None):
            if Capturing.capturing:
                return argparse.Namespace()
            return super().parse_args(args, namespace)

    # Only clip_benchmark.cli sees the swap: its `argparse` becomes a copy with our class.
    argparse_copy = types.SimpleNamespace(**{**vars(argparse), "ArgumentParser": Capturing})
    with swapped([(cb_cli, "argparse", argparse_copy)]):
        parser, _ = cb_cli.get_parser_args()
    Capturing.capturing = False
    for action in parser._actions:  # argparse keeps no public handle on its subparsers
        if isinstance(action, argparse._SubParsersAction):
            evaluate = action.choices["eval"]
            break
    else:
        raise RuntimeError("CLIP_benchmark's parser has no subcommands; is clip-benchmark >= "
                           "1.6 installed?")
    for action in evaluate._actions:
        if action.dest == "amp":  # its own help ("whether to use mixed precision") reads inverted
            action.help = AMP_HELP
    add_tokenprune_eval_flags(evaluate)
    return parser


def parse_eval_args(argv):
    """The namespace of an `eval ...` command line, from CLIP_benchmark's own parser."""
    return eval_parser().parse_args(argv)


def _flags(config):
    """The configuration as eval's flags set it (the random selection's seed is no flag: 0)."""
    return {name: getattr(config, name) for name in PRUNING_DEFAULTS}


def accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's zero-shot top-k accuracy, working on numpy >= 2.4.

    Its last line, `float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()) / n`
    (clip_benchmark/metrics/zeroshot_classification.py, line 82), converts a one-element 1-D
    array with float(): deprecated since numpy 1.25, a TypeError ("only 0-dimensional arrays can
    be converted to Python scalars") since numpy 2.4. Same float32 sum, taken with .item(),
    so the numbers are those CLIP_benchmark gives on older numpy.
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0).item() / n for k in topk]


class _EncodeTimer:
    """Wall time of `encode_image` calls (synchronised on CUDA); the first call is warm-up."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.calls = []  # (images, seconds)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, encode_image):
        @functools.wraps(encode_image)
        def timed(images, *args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = encode_image(images, *args, **kwargs)
            self._sync()
            self.calls.append((len(images), time.perf_counter() - start))
            return out
        return timed

    def summary(self):
        if not self.calls:
            return None
        warmup = 1 if len(self.calls) > 1 else 0
        timed = self.calls[warmup:]
        images = sum(n for n, _ in timed)
        seconds = sum(s for _, s in timed)
        return {"images_per_second": images / seconds if seconds > 0 else None,
                "images": images, "seconds": seconds, "warmup_batches_excluded": warmup}


class _Session:
    """The hooks' shared state: the pruning configuration, and what the current run measured."""

    def __init__(self, args, config):
        self.args = args
        self.config = config
        self.enabled = args.enable_pruning
        self.run = None  # filled by load_clip for each (model, dataset, language) run
        self.outputs = []

    # -- clip_benchmark.cli.load_clip --------------------------------------------------------
    def wrap_load_clip(self, load_clip):
        @functools.wraps(load_clip)
        def load_clip_pruned(model_type, model_name, pretrained, cache_dir, device="cuda"):
            if model_name in SHIPPED_MODELS:  # checked before: runs on the shipped canvases
                model, transform, tokenizer = shipped.load_shipped_model(model_name, device)
                self.run = self._prepare(model, model_name, device)
                return model, transform, tokenizer
            tokenizer_dir = getattr(self.args, "tokenizer", None)
            if model_type == "open_clip":
                check_model(model_name, pretrained,
                            pruning_flag="--enable_pruning" if self.enabled else None)
                check_tokenizer(model_name, tokenizer_dir)
            with loading_errors(model_name, pretrained, tokenizer_dir=tokenizer_dir):
                model, transform, tokenizer = load_clip(model_type=model_type,
                                                        model_name=model_name,
                                                        pretrained=pretrained,
                                                        cache_dir=cache_dir, device=device)
            self.run = self._prepare(model, model_name, device)
            return model, transform, tokenizer
        return load_clip_pruned

    def _prepare(self, model, model_name, device):
        """Prune (if asked) and time the model; returns what goes into the JSON."""
        run = {"model": model_name, "device": str(device), "tokens_before": None,
               "tokens_after": None, "pruning": {"enabled": self.enabled}}
        visual = getattr(model, "visual", None)
        try:
            tower = find_tower(model)
        except UnsupportedModelError:
            tower = None  # unpruned runs of any model still work; tokens are then unknown
        if tower is not None:
            patches = tower.num_patches
            run["tokens_before"] = run["tokens_after"] = patches + tower.num_prefix
        if self.enabled:
            cfg = self.config
            if tower is not None:  # a tower whose config gave no depth: checked now, by stage
                check_blocks(self.args, len(tower.blocks))
            try:
                replace_last_block(model, config=cfg)
                backend_used = resolve_backend(cfg.backend, torch.empty(0, device=device))
            except UnsupportedModelError as err:
                raise CLIError(f"--enable_pruning: {err}") from err
            except ValueError as err:  # a value that only the built tower refuses
                raise CLIError(f"--{err}") from err
            except RuntimeError as err:  # --backend triton where it cannot run
                raise CLIError(f"--backend {cfg.backend}: {err}") from err
            blocks = len(tower.blocks)
            applied = cfg.kept_patches < patches
            if applied:
                run["tokens_after"] = tower.num_prefix + cfg.kept_patches
            else:
                note(nothing_to_prune_warning(model_name, getattr(visual, "image_size", None),
                                              cfg.kept_patches, patches))
            run["pruning"] = {"enabled": True, "applied": applied, **_flags(cfg),
                              "block": cfg.layer % blocks, "num_blocks": blocks,
                              "backend_used": backend_used}
        timer = _EncodeTimer(device)
        model.encode_image = timer.wrap(model.encode_image)
        run["timer"] = timer
        return run

    # -- clip_benchmark.cli.build_dataset ------------------------------------------------------
    def wrap_build_dataset(self, build_dataset):
        @functools.wraps(build_dataset)
        def build_dataset_checked(dataset_name, root="root", *args, **kwargs):
            if dataset_name in SHIPPED_DATASETS:
                return shipped.build_shipped_dataset(dataset_name, kwargs.get("transform"))
            try:
                dataset = build_dataset(dataset_name, root, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - translated, not swallowed
                raise CLIError(self._dataset_error(err, build_dataset, dataset_name, root,
                                                   kwargs.get("split", "?"))) from err
            if dataset_name.startswith("wds/"):
                _give_length(dataset, root, kwargs.get("split", "test"))
            return dataset
        return build_dataset_checked

    def _dataset_error(self, err, build_dataset, dataset_name, root, split):
        if _unknown_to_builder(err, build_dataset, dataset_name):
            return (f"unknown dataset {dataset_name!r}: use a CLIP_benchmark dataset name (e.g. "
                    "cifar10, imagenet1k, vtab/...) or a local WebDataset: --dataset wds/NAME "
                    "--dataset_root DIR")
        message = (str(err).strip().splitlines() or [""])[0]
        where = (f"--dataset_root {root!r}" if self.args.dataset_root != DEFAULT_DATASET_ROOT else
                 f"{os.path.abspath(root)!r} (no --dataset_root given: CLIP_benchmark's default "
                 f"is the folder {DEFAULT_DATASET_ROOT!r} here)")
        return (f"could not load dataset {dataset_name!r} (split {split!r}) from {where}: "
                f"{type(err).__name__}: {message}; without internet, point --dataset_root at a "
                "downloaded copy or use a local WebDataset: --dataset wds/NAME --dataset_root DIR")

    # -- clip_benchmark.cli.json.dump ----------------------------------------------------------
    def fields(self):
        """Our additions to CLIP_benchmark's results JSON."""
        args, run = self.args, self.run or {}
        pruning = run.get("pruning") or {"enabled": self.enabled}
        if self.enabled and "k_anchors" not in pruning:  # --skip_load: no model was loaded
            pruning = {"enabled": True, **_flags(self.config)}
        throughput = run["timer"].summary() if "timer" in run else None
        if throughput is not None:
            throughput.update(device=run["device"], amp=args.amp, batch_size=args.batch_size)
        return {"pruning": pruning, "tokens_before": run.get("tokens_before"),
                "tokens_after": run.get("tokens_after"), "throughput": throughput}

    def dump(self, obj, fp, *args, **kwargs):
        if isinstance(obj, dict) and "metrics" in obj:
            # null for a non-finite metric (acc5 is NaN with fewer than 5 classes): strict
            # JSON parsers reject the bare NaN that json.dump writes.
            obj = json_safe({**obj, **self.fields()})
            kwargs["allow_nan"] = False
            self.outputs.append(getattr(fp, "name", None))
            self._report(obj)
        return json.dump(obj, fp, *args, **kwargs)

    def _report(self, result):
        metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else
                            f"{k} n/a" if v is None else f"{k} {v}"
                            for k, v in result["metrics"].items())
        speed = result["throughput"] and result["throughput"]["images_per_second"]
        speed = f"{speed:.1f} images/s" if speed else "throughput not measured"
        tokens = (f"; {result['tokens_before']} -> {result['tokens_after']} tokens"
                  if result["tokens_before"] else "")
        pruning = result["pruning"]
        if pruning.get("applied") and pruning.get("schedule"):
            blocks = [str(layer % pruning["num_blocks"] + 1) for layer, _, _ in pruning["schedule"]]
            mode = f"pruned at blocks {', '.join(blocks)} of {pruning['num_blocks']} (a schedule)"
        elif pruning.get("applied"):
            # 1-based in prose; the JSON's "block" is the 0-based index into resblocks.
            mode = (f"pruned at block {pruning['block'] + 1} of {pruning['num_blocks']} "
                    f"(index {pruning['block']})")
        else:
            mode = "unpruned"
        note(f"{result['dataset']} / {result['model']} ({mode}): {metrics}; image encoding "
             f"{speed}{tokens}")


def nothing_to_prune_warning(model_name, image_size, kept_patches, patches):
    """The warning for k + m >= the model's patches, with k and m that would prune it (about
    a third of its patches kept, as the defaults keep 60 of ViT-B/16's 196)."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = "x".join(map(str, image_size)) + " px" if image_size else "its image size"
    k = max(1, patches // 40)
    m = max(0, min(patches // 4, patches - k - 1))
    return (f"warning: k_anchors + top_m = {kept_patches} >= {patches} patches of {model_name} "
            f"at {size}: nothing to prune, the model runs unpruned (keep fewer than {patches}, "
            f"e.g. --k_anchors {k} --top_m {m}, or use a model with more patches: a smaller "
            "patch or a larger image size)")


class _JsonModule:
    """Stands in for `json` inside clip_benchmark.cli: everything is json's, except dump."""

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        return getattr(json, name)

    def dump(self, obj, fp, *args, **kwargs):
        return self._session.dump(obj, fp, *args, **kwargs)


@contextmanager
def clip_benchmark_hooks(args, config):
    """Install the hooks described at the top of this file for the duration of the block."""
    for module, name in ((cb_cli, "load_clip"), (cb_cli, "build_dataset"), (cb_cli, "json"),
                         (cb_cli, "main_eval"), (zeroshot_classification, "accuracy")):
        if not hasattr(module, name):
            from importlib.metadata import version
            raise CLIError(f"clip-benchmark {version('clip-benchmark')} has no "
                           f"{module.__name__}.{name}, which tokenprune eval hooks into "
                           "(tested with clip-benchmark 1.6.2)")
    session = _Session(args, config)
    swaps = [(cb_cli, "load_clip", session.wrap_load_clip(cb_cli.load_clip)),
             (cb_cli, "build_dataset", session.wrap_build_dataset(cb_cli.build_dataset)),
             (cb_cli, "json", _JsonModule(session)),
             (zeroshot_classification, "accuracy", accuracy)]
    with warnings.catch_warnings(), swapped(swaps):
        # The block's own no-op warning repeats the one _prepare printed, once per run.
        warnings.filterwarnings("ignore", message=NOOP_WARNING)
        yield session


def run_eval(args):
    config = prune_config(args)
    if not args.enable_pruning:
        changed = [f"--{name}" for name, default in PRUNING_DEFAULTS.items()
                   if getattr(args, name, default) != default]
        if changed:
            note(f"note: {', '.join(changed)} given without --enable_pruning: evaluating the "
                 "unpruned model")
    # CLIP_benchmark runs on CUDA when there is one, else on the CPU (it has no --device).
    if args.amp and not torch.cuda.is_available() and not cpu_has_native_bfloat16():
        note("note: running on the CPU with CLIP_benchmark's default mixed precision (bfloat16 "
             "autocast), which is often several times slower on a CPU without native bfloat16 "
             "(AVX512-BF16 or AMX), as this one seems to be; add --no_amp to run in float32")
    with quiet_warnings(args.show_warnings), clip_benchmark_hooks(args, config) as session:
        cb_cli.main_eval(args)
    return session.outputs


# ----- datasets -----------------------------------------------------------------------------

def _unknown_to_builder(err, build_dataset, dataset_name):
    """Whether CLIP_benchmark's build_dataset refused `dataset_name` as a name it does not
    know: a ValueError raised by build_dataset itself (not by a dataset it called), for a name
    that none of its branches compares against."""
    if not isinstance(err, ValueError):
        return False
    frames = _traceback_codes(err)
    code = getattr(inspect.unwrap(build_dataset), "__code__", None)
    if not frames or code is None or frames[-1] is not code:
        return False
    if dataset_name.split("/", 1)[0] in ("wds", "tfds", "vtab"):
        return False
    names = set()
    for const in code.co_consts:
        names.update(const if isinstance(const, tuple) else (const,))
    return dataset_name not in names


def _traceback_codes(err):
    """The code objects of the frames `err` passed through, innermost last."""
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return frames


def _count_wds_samples(root, split):
    """Samples in a local WebDataset split (image files in its tar shards), or None when that
    cannot be known without reading remote data."""
    if "://" in root:
        return None
    try:
        with open(os.path.join(root, split, "nshards.txt")) as f:
            shards = int(f.read())
        count = 0
        for shard in range(shards):
            with tarfile.open(os.path.join(root, split, f"{shard}.tar")) as tar:
                keys = {os.path.splitext(member.name)[0] for member in tar
                        if os.path.splitext(member.name)[1].lower() in WDS_IMAGE_EXTENSIONS}
            count += len(keys)
        return count
    except (OSError, ValueError, tarfile.TarError):
        return None


def _give_length(dataset, root, split):
    """Give CLIP_benchmark's WebDataset (and the batched one it makes of it) a length, so that
    its progress bar has a total and an ETA, and no "IterableDataset has no len()" is printed."""
    count = _count_wds_samples(root, split)
    if not count or not hasattr(dataset, "with_length"):
        return
    dataset.with_length(count, silent=True)
    batched = dataset.batched

    def batched_with_length(batch_size, *args, **kwargs):
        return batched(batch_size, *args, **kwargs).with_length(math.ceil(count / batch_size),
                                                          silent=True)
    dataset.batched = batched_with_length
