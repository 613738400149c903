"""tokenprune_internvl_hf: lmms-eval's own `internvl_hf` model (its chat implementation, which
`--model internvl_hf` runs), pruned by tokenprune.prune_image_tokens.

The base runs one prompt per generate (it asserts batch_size 1), and so does this model. It
loads the model in bfloat16 whatever is asked, and scores a failed generate as an empty answer;
here a failed generate raises instead, so that an error never passes for a wrong answer.

Imported by lmms-eval only, when a run asks for this model: it needs lmms-eval installed.
"""
from lmms_eval.models.chat.internvl_hf import InternVLHf

from .measure import PruningPlugin


class TokenpruneInternVLHf(PruningPlugin, InternVLHf):
    """lmms-eval's internvl_hf with the pruning arguments of tokenprune.lmms.PRUNING_ARGUMENTS.
    `device_map` defaults to the CPU when `device` is the CPU (the base's "auto" is for CUDA)."""

    MODEL_ID = "tokenprune_internvl_hf"

    def __init__(self, device_map=None, **arguments):
        pruning, base, record = self.split_arguments(arguments)
        on_cpu = str(base.get("device")) == "cpu"
        super().__init__(device_map=device_map or ("cpu" if on_cpu else "auto"), **base)
        self.start_pruning(self.model, self.processor, pruning, record)
        self.failures = []
        self.model.generate = NotingFailures(self.model.generate, self.failures)

    def images_in(self, inputs):
        """InternVL's pixel_values hold tiles: an image is a <img> ... </img> of the prompt."""
        return int((inputs["input_ids"] == self.processor.start_image_token_id).sum())

    def generate_until(self, requests):
        self.failures.clear()
        results = super().generate_until(requests)
        if self.failures:  # the base logged it and went on with an empty answer
            raise self.failures[0]
        self.log_measurements()
        return results


class NotingFailures:
    """A generate that notes what it raised in `failures` before raising it."""

    def __init__(self, generate, failures):
        self.generate = generate
        self.failures = failures

    def __call__(self, *args, **kwargs):
        try:
            return self.generate(*args, **kwargs)
        except Exception as err:
            self.failures.append(err)
            raise
