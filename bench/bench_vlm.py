"""A LLaVA model's cost with fewer image tokens: tokenprune.prune_image_tokens against the
unpruned model and against the llmc / FasterVLM-style baseline (bench/llmc_baseline.py).

The model comes from tools/tiny_llava.py with random weights (speed does not depend on them):
on CUDA LLaVA-1.5-7B's configuration in float16, on the CPU its shapes scaled down (576 image
tokens), with the smoke run the tiny one (bench/conftest.py). Each image is random pixels; the
prompt is about 40 text tokens around the image placeholders, the same for every sample, so
nothing is padded.

Providers, per batch: "unpruned" (576 image tokens per image); "ours" with k + m image tokens
(k = 10), one batched forward whose tower runs its usual attention (sdpa); "baseline" with the
same selection computed from output_attentions=True in an eager tower, everything at batch 1,
one sample after the other, as the tools it stands for do.

- prefill: from pixels and prompt to the first token (the tower, the selection, the projector
  and the language model over the whole prompt, with the KV cache filled); images/s = batch /
  median time.
- decode: VLM_DECODE_STEPS greedy steps with the KV cache, from a copy of one prefill's state
  (not timed); tokens/s = batch * steps / median time.
- peak memory: of one prefill and its decoding together, measured once per prefill row and
  stored in its extra_info as bench/conftest.py's `peak_memory` measures it (CUDA:
  max_memory_allocated above what was allocated before, so the weights are not counted, and the
  total; CPU: torch's CPU allocator events recorded by torch.profiler).
"""
import copy

import pytest
import torch

pytest.importorskip("transformers")

from llmc_baseline import LlmcBaseline, decode_steps  # noqa: E402
from tiny_llava import build_llava  # noqa: E402

import tokenprune  # noqa: E402

K_ANCHORS = 10
TOKENS_CHECKED = 64  # the baseline's selection is checked against ours at this k + m
PROMPT = ("what is the color of the big dog on the left of the picture , and how many people "
          "are there in the middle of it ? describe the sky and the road . is there a sign ?")


@pytest.fixture(scope="session")
def llava(env):
    """(model, processor) of the configuration this device runs, made once."""
    return build_llava("clip", env.vlm.size, seed=0, dtype=env.dtype, device=env.device)


def inputs(model, processor, batch, image_tokens, device, dtype):
    """(input_ids, attention_mask, pixel_values) for `batch` samples with `image_tokens`
    placeholders each."""
    text = f"USER: {'<image>' * image_tokens}\n{PROMPT} ASSISTANT:"
    encoded = processor.tokenizer([text] * batch, return_tensors="pt")
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return (encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
            pixels.to(device, dtype))


def anchors_and_rest(tokens):
    """(k, m) for k + m = tokens: k = 10, or half of a smaller count (the tiny smoke model)."""
    k = K_ANCHORS if tokens > K_ANCHORS else max(1, tokens // 2)
    return k, tokens - k


def text_tokens(processor):
    return len(processor.tokenizer(f"USER: <image>\n{PROMPT} ASSISTANT:")["input_ids"]) - 1


def batched_prefill(model, input_ids, attention_mask, pixel_values):
    """(first tokens (B, 1), cache, attention mask) of one batched forward over the prompt."""
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values, attention_mask


def test_vlm(vlm_case, env, llava, benchmark):
    case = vlm_case
    model, processor = llava
    steps = env.vlm.decode_steps
    full = model.config.image_seq_length
    pruned = case.image_tokens is not None
    tokens = case.image_tokens if pruned else full
    if tokens > full:
        pytest.skip(f"{tokens} image tokens is more than the model's {full}")
    input_ids, attention_mask, pixel_values = inputs(model, processor, case.batch, tokens,
                                                     env.device, env.dtype)
    k, m = anchors_and_rest(tokens)
    baseline = LlmcBaseline(model, k, m) if case.provider == "baseline" else None

    @torch.no_grad()
    def prefill():
        if baseline is not None:
            states = baseline.prefill(input_ids, pixel_values, attention_mask)
        else:
            states = [batched_prefill(model, input_ids, attention_mask, pixel_values)]
        env.sync()
        return states

    @torch.no_grad()
    def decode(states):
        for state in states:
            decode_steps(model, *state, steps)
        env.sync()

    def request():
        decode(prefill())

    try:
        if case.provider == "ours":
            # The seed's selection, as the baseline computes it and the rows above measured.
            tokenprune.prune_image_tokens(model, k_anchors=k, top_m=m, selection="score")
            assert model.config.image_seq_length == tokens
        info = dict(kind="vlm", measure=case.measure, provider=case.provider,
                    llava=env.vlm.size, batch=case.batch, image_tokens=tokens,
                    image_tokens_unpruned=full, text_tokens=text_tokens(processor),
                    k=k if pruned else None, m=m if pruned else None,
                    backend=env.resolve("auto") if case.provider == "ours" else None,
                    decode_steps=steps, vision_feature_layer=model.config.vision_feature_layer,
                    language_model_batch=1 if baseline else case.batch,
                    device=env.device_name(), device_type=env.device.type,
                    dtype=str(env.dtype).replace("torch.", ""),
                    torch_threads=torch.get_num_threads(), versions=env.versions())
        if case.measure == "prefill":
            info["peak_mem_bytes"], info["peak_mem_total_bytes"] = env.peak_memory(request)
        benchmark.group = f"vlm {case.measure} {env.vlm.size} B={case.batch}"
        benchmark.extra_info.update(info)
        rounds, warmup = env.vlm.rounds[case.measure]
        if case.measure == "prefill":
            benchmark.pedantic(prefill, rounds=rounds, warmup_rounds=warmup, iterations=1)
        else:
            # Decoding changes the cache in place: every round starts from a copy of one
            # prefill's (copying is cheaper than prefilling again, and is not timed).
            prefilled = prefill()
            benchmark.pedantic(decode, setup=lambda: ((copy.deepcopy(prefilled),), {}),
                               rounds=rounds, warmup_rounds=warmup, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            median = stats.stats.median
            if case.measure == "prefill":
                benchmark.extra_info["images_per_s"] = case.batch / median
            else:
                benchmark.extra_info["tokens_per_s"] = case.batch * steps / median
    finally:
        if case.provider == "ours":
            tokenprune.remove_pruning(model)


def test_baseline_keeps_what_prune_image_tokens_keeps(env, llava):
    """The baseline computes the same selection the other way: same image features per image
    (up to eager against sdpa rounding), so the benchmark compares costs, not selections."""
    model, processor = llava
    tokens = min(TOKENS_CHECKED, model.config.image_seq_length - 1)
    _, _, pixel_values = inputs(model, processor, 2, tokens, env.device, env.dtype)
    baseline = LlmcBaseline(model, *anchors_and_rest(tokens))
    with torch.no_grad():
        theirs = torch.cat([baseline.image_features(pixel_values[i:i + 1]) for i in range(2)])
        tokenprune.prune_image_tokens(model, k_anchors=baseline.k_anchors,
                                      top_m=baseline.top_m, backend="reference",
                                      selection="score")
        try:
            ours = model.get_image_features(pixel_values=pixel_values)
        finally:
            tokenprune.remove_pruning(model)
    ours = getattr(ours, "pooler_output", ours)
    ours = torch.stack(list(ours)) if isinstance(ours, (list, tuple)) else ours
    assert ours.shape == theirs.shape == (2, tokens, model.config.text_config.hidden_size)
    tolerance = 2e-2 if env.dtype == torch.float16 else 1e-4
    torch.testing.assert_close(ours.float(), theirs.float(), atol=tolerance, rtol=tolerance)

