"""What tokenprune's lmms-eval models add to their base: the pruning, applied once the base has
loaded, and the measurements the results record (docs/lmms-eval.md, "Where the results record
the pruning"). Imported by lmms-eval only, with the model classes."""
import json
import resource
import time

import torch
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from . import PruningArgumentError, declared_arguments, split_pruning_arguments
from ..towers import UnsupportedModelError
from ..vlm import prune_image_tokens


def peak_memory_mib(device):
    """The peak memory so far: allocated on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux: kB


class PruningPlugin:
    """Mixed into an lmms-eval model class before its base. `MODEL_ID` names the model."""

    MODEL_ID = None

    @classmethod
    def split_arguments(cls, arguments):
        """(pruning, base, record path): checked before the base loads anything; a name that
        neither we nor the base take (say ratoi=0.5) is refused here, in one line."""
        arguments = dict(arguments)
        record = arguments.pop("tokenprune_record", None)
        # The lmms-eval model we wrap: the first class after ours in the method order.
        base_class = next(c for c in cls.__mro__ if not issubclass(c, PruningPlugin))
        pruning, base = split_pruning_arguments(cls.MODEL_ID, arguments,
                                                declared_arguments(base_class),
                                                ours=("tokenprune_record",))
        return pruning, base, record

    def start_pruning(self, model, processor, pruning, record_path):
        """Prune the loaded model (when there are pruning arguments), and measure each of its
        `generate` calls: image tokens per image from its input_ids, time to first token."""
        self.pruning, self.record_path = pruning, record_path
        # This generate_until call's (lmms-eval makes one per task), and the whole run's.
        self.measured, self.run_measured = self._nothing_measured(), self._nothing_measured()
        if pruning:
            try:
                prune_image_tokens(model, processor, **pruning)
            # A layer outside the tower, or a model class that is not its config's family's
            # (an MoE checkpoint loaded as dense): one line, status 1.
            except (ValueError, UnsupportedModelError) as err:
                raise PruningArgumentError(self.MODEL_ID, str(err)) from None
        image_token = model.config.image_token_id
        generate = model.generate
        first_token = []

        def prefill_done(module, args, output):
            if not first_token:
                if self._device.type == "cuda":
                    torch.cuda.synchronize(self._device)
                first_token.append(time.perf_counter())

        def measured_generate(*args, **kwargs):
            self.measured["images"] += self.images_in(kwargs)
            self.measured["image_tokens"] += int((kwargs["input_ids"] == image_token).sum())
            first_token.clear()
            hook = model.register_forward_hook(prefill_done)
            try:
                start = time.perf_counter()
                output = generate(*args, **kwargs)
            finally:
                hook.remove()
            self.measured["first_token_s"].append(first_token[0] - start)
            return output

        model.generate = measured_generate
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    @staticmethod
    def images_in(inputs):
        """The images of a generate call's inputs: a row of image_grid_thw each (Qwen-VL), else
        a row of pixel_values each (the LLaVA families, Gemma 3)."""
        grid = inputs.get("image_grid_thw")
        pixels = inputs.get("pixel_values")
        return len(grid) if grid is not None else (0 if pixels is None else len(pixels))

    @staticmethod
    def _nothing_measured():
        return {"images": 0, "image_tokens": 0, "first_token_s": []}

    def measurements(self, m):
        """The pruning settings and what they gave in `m`. The time to first token is the mean
        over generate calls (each prompt of a batch waits for it)."""
        return {"model": self.MODEL_ID, "pruned": bool(self.pruning), **self.pruning,
                "batch_size": self.batch_size,
                "image_tokens_per_image": m["image_tokens"] / m["images"] if m["images"] else None,
                "time_to_first_token_s": (sum(m["first_token_s"]) / len(m["first_token_s"])
                                          if m["first_token_s"] else None),
                "peak_memory_mib": peak_memory_mib(self._device)}

    def log_measurements(self):
        """At the end of a generate_until call: its measurements into lmms-eval's `throughput`
        results (numeric fields, as avg_tokenprune_*; no tokens or time of their own, so its
        totals stay the base's), and the whole run's into the record file if one was asked."""
        measured = self.measurements(self.measured)
        for key, value in self.measured.items():
            self.run_measured[key] += value
        self.measured = self._nothing_measured()
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0,
                    additional_metrics={f"tokenprune_{k}": v for k, v in measured.items()
                                        if isinstance(v, (int, float))
                                        and not isinstance(v, bool)})
        if self.record_path:
            with open(self.record_path, "w", encoding="utf-8") as f:
                json.dump(self.measurements(self.run_measured), f, indent=2)


class BatchingBasePlugin(PruningPlugin):
    """For a base that loads its model and processor as `self.model` and `self.processor` and
    already runs real (left-padded) batches: only the pruning, once it has loaded, and the
    measurements after each generate_until are added."""

    def __init__(self, **arguments):
        pruning, base, record = self.split_arguments(arguments)
        # The bases' device_map ("auto", which sends the inputs to "cuda", or "cuda"): on the
        # CPU, the CPU.
        if str(base.get("device")) == "cpu":
            base.setdefault("device_map", "cpu")
        super().__init__(**base)
        self.start_pruning(self.model, self.processor, pruning, record)

    def generate_until(self, requests):
        results = super().generate_until(requests)
        self.log_measurements()
        return results
