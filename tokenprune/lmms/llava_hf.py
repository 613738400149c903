"""tokenprune_llava_hf: lmms-eval's own `llava_hf` model (its chat implementation, which
`--model llava_hf` runs), pruned by tokenprune.prune_image_tokens, with real batches.

Imported by lmms-eval only, when a run asks for this model: it needs lmms-eval installed.
"""
import json
import resource
import time

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.models.chat.llava_hf import LlavaHf
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm

from . import split_pruning_arguments
from ..vlm import prune_image_tokens

MODEL_ID = "tokenprune_llava_hf"


def peak_memory_mib(device):
    """The peak memory so far: allocated on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux: kB


class TokenpruneLlavaHf(LlavaHf):
    """lmms-eval's llava_hf with the pruning arguments of tokenprune.lmms.PRUNING_ARGUMENTS.

    Differences from the base, each on purpose:
    - `--batch_size N` runs N prompts per `generate` (left-padded), where the base asserts 1;
    - `device_map` defaults to the device (transformers 5.25 refuses the base's default "");
    - a failed `generate` raises instead of scoring an empty answer, so that an error never
      passes for a wrong answer;
    - each answer records the language model's input tokens (`token_counts.input_tokens`), and
      `log_metrics` adds the image tokens per image, the time to first token, the peak memory
      and the numeric pruning settings to lmms-eval's `throughput` results;
    - `tokenprune_record=PATH` writes all of that, the selection included, as JSON.
    """

    def __init__(self, device_map=None, tokenprune_record=None, **arguments):
        pruning, base = split_pruning_arguments(MODEL_ID, arguments)
        if device_map is None:
            device_map = str(base.get("device", "cuda"))
        super().__init__(device_map=device_map, **base)
        self.pruning = pruning
        self.record_path = tokenprune_record
        # Over every generate_until call of the run (lmms-eval makes one per task).
        self.totals = {"images": 0, "image_tokens": 0, "first_token_s": []}
        if pruning:
            prune_image_tokens(self._model, self._image_processor, **pruning)

    def _prompt(self, messages):
        return self._image_processor.apply_chat_template(
            messages.model_dump()["messages"], tokenize=False, add_generation_prompt=True)

    def _generate(self, chunk):
        """One batch of requests: (prompts, answers, their TokenCounts, images, image tokens the
        language model received, time to first token in s)."""
        _, doc_to_messages, all_gen_kwargs, doc_ids, tasks, splits = zip(*chunk)
        docs = self.task_dict[tasks[0]][splits[0]]
        conversations = [ChatMessages(messages=doc_to_messages[0](docs[i])) for i in doc_ids]
        images, videos = [], []
        for conversation in conversations:
            image, video, _ = conversation.extract_media()
            images += image
            videos += video
        prompts = [self._prompt(c) for c in conversations]
        inputs = self._image_processor(images=images or None, videos=videos or None,
                                       text=prompts, padding=True, return_tensors="pt",
                                       ).to(self._device, self.model.dtype)
        # The same generation settings as the base, for every prompt of the batch (lmms-eval
        # batches only requests with equal gen_kwargs).
        gen_kwargs = dict(all_gen_kwargs[0])
        temperature = gen_kwargs.get("temperature", 0)
        do_sample = temperature > 0

        first_token = []

        def prefill_done(module, args, output):
            if not first_token:
                if self._device.type == "cuda":
                    torch.cuda.synchronize(self._device)
                first_token.append(time.perf_counter())

        hook = self.model.register_forward_hook(prefill_done)
        try:
            start = time.perf_counter()
            output = self.model.generate(
                **inputs, do_sample=do_sample, temperature=temperature if do_sample else None,
                top_p=gen_kwargs.get("top_p"), num_beams=gen_kwargs.get("num_beams", 1),
                max_new_tokens=gen_kwargs.get("max_new_tokens", 1024), use_cache=self.use_cache,
                pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
        finally:
            hook.remove()
        prompt_length = inputs["input_ids"].shape[1]  # left-padded: the same for every row
        answers, counts = [], []
        for row, generated in zip(inputs["attention_mask"], output[:, prompt_length:]):
            # A finished row is filled up with the end token: count up to its first one, as a
            # batch of one stops there.
            ends = (generated == self.eot_token_id).nonzero()
            length = int(ends[0]) + 1 if len(ends) else len(generated)
            answers.append(self.tokenizer.decode(generated[:length], skip_special_tokens=True))
            counts.append(TokenCounts(input_tokens=int(row.sum()), output_tokens=length))
        image_tokens = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        return prompts, answers, counts, len(images), image_tokens, first_token[0] - start

    def generate_until(self, requests):
        # Requests with equal gen_kwargs (x[2]) are batched together, in doc order (x[3]).
        ordered = utils.Collator([r.args for r in requests], lambda x: (x[3], x[3]),
                                 group_fn=lambda x: x[2], grouping=True)
        results, first_token_s = [], []
        images = image_tokens = 0
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        start = time.perf_counter()
        for chunk in ordered.get_batched(n=self.batch_size, batch_fn=None):
            prompts, answers, counts, batch_images, batch_image_tokens, ttft = \
                self._generate(chunk)
            for args, prompt, answer, count in zip(chunk, prompts, answers, counts):
                results.append(GenerationResult(text=answer, token_counts=count))
                self.cache_hook.add_partial("generate_until", (prompt, args[2]), answer)
            images += batch_images
            image_tokens += batch_image_tokens
            first_token_s.append(ttft)
            progress.update(len(chunk))
        progress.close()
        elapsed = time.perf_counter() - start
        generated = sum(r.token_counts.output_tokens for r in results)
        totals = self.totals
        totals["images"] += images
        totals["image_tokens"] += image_tokens
        totals["first_token_s"] += first_token_s
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=generated,
                    avg_speed=generated / elapsed if elapsed > 0 else 0.0,
                    additional_metrics={"rank": self.rank, **{
                        f"tokenprune_{k}": v for k, v in self._measurements(
                            images, image_tokens, first_token_s).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}})
        if self.record_path:
            with open(self.record_path, "w", encoding="utf-8") as f:
                json.dump(self._measurements(totals["images"], totals["image_tokens"],
                                             totals["first_token_s"]), f, indent=2)
        return ordered.get_original(results)

    def _measurements(self, images, image_tokens, first_token_s):
        """What the results record: the pruning settings and what they gave. The time to first
        token is the mean over batches (each prompt of a batch waits for it)."""
        return {"model": MODEL_ID, "pruned": bool(self.pruning), **self.pruning,
                "batch_size": self.batch_size,
                "image_tokens_per_image": image_tokens / images if images else None,
                "time_to_first_token_s": (sum(first_token_s) / len(first_token_s)
                                          if first_token_s else None),
                "peak_memory_mib": peak_memory_mib(self._device)}
