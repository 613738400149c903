"""tokenprune_llava_hf: lmms-eval's own `llava_hf` model (its chat implementation, which
`--model llava_hf` runs), pruned by tokenprune.prune_image_tokens, with real batches.

Imported by lmms-eval only, when a run asks for this model: it needs lmms-eval installed.
"""
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.models.chat.llava_hf import LlavaHf
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm

from .measure import PruningPlugin


class TokenpruneLlavaHf(PruningPlugin, LlavaHf):
    """lmms-eval's llava_hf with the pruning arguments of tokenprune.lmms.PRUNING_ARGUMENTS.

    Differences from the base, each on purpose:
    - `--batch_size N` runs N prompts per `generate` (left-padded), where the base asserts 1;
    - `device_map` defaults to the device (transformers 5.25 refuses the base's default "");
    - a failed `generate` raises instead of scoring an empty answer, so that an error never
      passes for a wrong answer;
    - each answer records the language model's input tokens (`token_counts.input_tokens`);
    - the measurements of PruningPlugin.
    """

    MODEL_ID = "tokenprune_llava_hf"

    def __init__(self, device_map=None, **arguments):
        pruning, base, record = self.split_arguments(arguments)
        if device_map is None:
            device_map = str(base.get("device", "cuda"))
        super().__init__(device_map=device_map, **base)
        self.start_pruning(self._model, self._image_processor, pruning, record)

    def _generate(self, chunk):
        """One batch of requests: (prompts, answers, their TokenCounts)."""
        _, doc_to_messages, all_gen_kwargs, doc_ids, tasks, splits = zip(*chunk)
        docs = self.task_dict[tasks[0]][splits[0]]
        conversations = [ChatMessages(messages=doc_to_messages[0](docs[i])) for i in doc_ids]
        images, videos = [], []
        for conversation in conversations:
            image, video, _ = conversation.extract_media()
            images += image
            videos += video
        prompts = [self._image_processor.apply_chat_template(
            c.model_dump()["messages"], tokenize=False, add_generation_prompt=True)
            for c in conversations]
        inputs = self._image_processor(images=images or None, videos=videos or None,
                                       text=prompts, padding=True, return_tensors="pt",
                                       ).to(self._device, self.model.dtype)
        # The base's generation settings, for every prompt of the batch (lmms-eval batches only
        # requests with equal gen_kwargs).
        gen_kwargs = all_gen_kwargs[0]
        temperature = gen_kwargs.get("temperature", 0)
        do_sample = temperature > 0
        output = self.model.generate(
            **inputs, do_sample=do_sample, temperature=temperature if do_sample else None,
            top_p=gen_kwargs.get("top_p"), num_beams=gen_kwargs.get("num_beams", 1),
            max_new_tokens=gen_kwargs.get("max_new_tokens", 1024), use_cache=self.use_cache,
            pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
        prompt_length = inputs["input_ids"].shape[1]  # left-padded: the same for every row
        answers, counts = [], []
        for row, generated in zip(inputs["attention_mask"], output[:, prompt_length:]):
            # A finished row is filled up with the end token: count up to its first one, as a
            # batch of one stops there.
            ends = (generated == self.eot_token_id).nonzero()
            length = int(ends[0]) + 1 if len(ends) else len(generated)
            answers.append(self.tokenizer.decode(generated[:length], skip_special_tokens=True))
            counts.append(TokenCounts(input_tokens=int(row.sum()), output_tokens=length))
        return prompts, answers, counts

    def generate_until(self, requests):
        # Requests with equal gen_kwargs (x[2]) are batched together, in doc order (x[3]).
        ordered = utils.Collator([r.args for r in requests], lambda x: (x[3], x[3]),
                                 group_fn=lambda x: x[2], grouping=True)
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in ordered.get_batched(n=self.batch_size, batch_fn=None):
            for args, prompt, answer, count in zip(chunk, *self._generate(chunk)):
                results.append(GenerationResult(text=answer, token_counts=count))
                self.cache_hook.add_partial("generate_until", (prompt, args[2]), answer)
            progress.update(len(chunk))
        progress.close()
        self.log_measurements()
        return ordered.get_original(results)
