"""`tokenprune eval`: CLIP_benchmark's own evaluation, with the pruning applied to the model it
loads.

How it hooks in: `clip_benchmark.cli.main_eval` runs unchanged (its loop over models, datasets
and languages, the --distributed split, datasets, class names, templates, metrics and output
naming). While it runs, four names inside CLIP_benchmark are swapped, and put back afterwards:

- `clip_benchmark.cli.load_clip`: loads the model exactly as before, then, with
  --enable_pruning, replaces one block with the pruned block (`replace_last_block`); in both
  modes it times `encode_image`, the image-encoding throughput that goes into the JSON.
- `clip_benchmark.cli.build_dataset`: unchanged; its failures become one-line errors.
- `clip_benchmark.cli.json`: the `json` module, except that the results dump gets our fields
  (the pruning configuration, tokens before and after, throughput) next to CLIP_benchmark's.
- `clip_benchmark.metrics.zeroshot_classification.accuracy`: see `accuracy` below (numpy 2.4).
"""
import functools
import json
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict

import torch
from clip_benchmark import cli as cb_cli
from clip_benchmark.metrics import zeroshot_classification

from .cli import PRUNING_DEFAULTS, CLIError, check_model, loading_errors, prune_config
from .patch import UnsupportedModelError, replace_last_block
from .selection import resolve_backend
from .towers import find_tower

NOOP_WARNING = r"k_anchors \+ top_m = \d+ >= \d+ patch tokens"


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
            if model_type == "open_clip":
                check_model(model_name, pretrained, pruning=self.enabled)
            with loading_errors(model_name, pretrained):
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
            try:
                replace_last_block(model, config=cfg)
                backend_used = resolve_backend(cfg.backend, torch.empty(0, device=device))
            except UnsupportedModelError as err:
                raise CLIError(f"--enable_pruning: {err}") from None
            except (ValueError, RuntimeError) as err:
                raise CLIError(f"--{err}" if str(err).startswith(("layer", "backend"))
                               else str(err)) from None
            blocks = len(tower.blocks)
            applied = cfg.kept_patches < patches
            if applied:
                run["tokens_after"] = tower.num_prefix + cfg.kept_patches
            else:
                size = "x".join(map(str, getattr(visual, "image_size", ("?",))))
                print(f"tokenprune: warning: k_anchors + top_m = {cfg.kept_patches} >= "
                      f"{patches} patches of {model_name} at {size} px: nothing to prune, the "
                      "model runs unpruned (lower --k_anchors/--top_m, e.g. --k_anchors 5 "
                      "--top_m 30, or use a model with more patches, e.g. ViT-B-16)",
                      file=sys.stderr)
            run["pruning"] = {"enabled": True, "applied": applied, **asdict(cfg),
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
            try:
                return build_dataset(dataset_name, root, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - translated, not swallowed
                message = (str(err).strip().splitlines() or [type(err).__name__])[0]
                offline = ("without internet, point --dataset_root at a downloaded copy or use a "
                           "local WebDataset: --dataset wds/NAME --dataset_root DIR")
                if isinstance(err, ValueError) and message.startswith("Unsupported dataset"):
                    raise CLIError(f"unknown dataset {dataset_name!r}: use a CLIP_benchmark "
                                   "dataset name (e.g. cifar10, imagenet1k, vtab/...) or a local "
                                   "WebDataset: --dataset wds/NAME --dataset_root DIR") from None
                raise CLIError(f"could not load dataset {dataset_name!r} (split "
                               f"{kwargs.get('split', '?')!r}) from --dataset_root {root!r}: "
                               f"{type(err).__name__}: {message}; {offline}") from None
        return build_dataset_checked

    # -- clip_benchmark.cli.json.dump ----------------------------------------------------------
    def fields(self):
        """Our additions to CLIP_benchmark's results JSON."""
        args, run = self.args, self.run or {}
        pruning = run.get("pruning") or {"enabled": self.enabled}
        if self.enabled and "k_anchors" not in pruning:  # --skip_load: no model was loaded
            pruning = {"enabled": True, **asdict(self.config)}
        throughput = run["timer"].summary() if "timer" in run else None
        if throughput is not None:
            throughput.update(device=run["device"], amp=args.amp, batch_size=args.batch_size)
        return {"pruning": pruning, "tokens_before": run.get("tokens_before"),
                "tokens_after": run.get("tokens_after"), "throughput": throughput}

    def dump(self, obj, fp, *args, **kwargs):
        if isinstance(obj, dict) and "metrics" in obj:
            obj = {**obj, **self.fields()}
            self.outputs.append(getattr(fp, "name", None))
            self._report(obj)
        return json.dump(obj, fp, *args, **kwargs)

    def _report(self, result):
        metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in result["metrics"].items())
        speed = result["throughput"] and result["throughput"]["images_per_second"]
        speed = f"{speed:.1f} images/s" if speed else "throughput not measured"
        tokens = (f"{result['tokens_before']} -> {result['tokens_after']} tokens"
                  if result["tokens_before"] else "")
        mode = "pruned" if result["pruning"].get("applied") else "unpruned"
        print(f"tokenprune: {result['dataset']} / {result['model']} ({mode}): {metrics}; "
              f"image encoding {speed}; {tokens}", file=sys.stderr)


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
    originals = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        with warnings.catch_warnings():
            # The block's own no-op warning repeats the one _prepare printed, once per run.
            warnings.filterwarnings("ignore", message=NOOP_WARNING)
            for module, name, value in swaps:
                setattr(module, name, value)
            yield session
    finally:
        for module, name, value in originals:
            setattr(module, name, value)


def run_eval(args):
    config = prune_config(args)
    if not args.enable_pruning:
        changed = [f"--{name}" for name, default in PRUNING_DEFAULTS.items()
                   if getattr(args, name, default) != default]
        if changed:
            print(f"tokenprune: note: {', '.join(changed)} given without --enable_pruning: "
                  "evaluating the unpruned model", file=sys.stderr)
    with clip_benchmark_hooks(args, config) as session:
        cb_cli.main_eval(args)
    return session.outputs
