"""Qwen2.5-VL's cost with fewer image tokens, and the ceiling its token counts allow.

The model comes from tools/tiny_qwen_vl.py with random weights (speed does not depend on them):
the Qwen2.5-VL-7B-Instruct configuration in bfloat16, one 1288 x 728 image (92 x 52 patches,
1196 image tokens) per prompt and a prompt of about 40 text tokens. On CUDA at batch 1 and 4;
on the CPU at batch 1 only when TOKENPRUNE_BENCH_QWEN_7B=1 (the weights take about 17 GB: run
it alone); with TOKENPRUNE_BENCH_SMOKE=1 the tiny model at batch 1 and 2, a 64 x 48 image.

Providers: "unpruned", and prune_image_tokens at ratio 0.25 and 0.1 (default selection, mmr),
each with the selection at the last block's input (layer None) and inside the tower at
`layer` 7, 15 and -1 (the smoke run: -1 only).
Measures, each a pytest-benchmark row with its extra_info:
- ttft: one forward over the prompt with the image, to the first token's logits (the tower,
  the selection, the merger and the language model's prefill);
- vision: get_image_features alone (the tower and merger; for a pruned provider with the
  selection in it): selection overhead = pruned vision / unpruned vision - 1; a provider with
  `layer` also times its selecting block's pre-hook (the selection and the cut) inside these
  runs, extra_info selection_s (median);
- lm: the language model's prefill alone over the prompt's token count for that provider
  (random embeddings at the prompt's positions).
The ceiling of a pruned provider is unpruned ttft / (unpruned vision + lm at the kept count),
and with `layer` unpruned ttft / (its vision - selection_s + lm at the kept count: the first L
blocks on every patch, the rest on the kept ones), from the medians; bench/qwen_vl_report.py
prints each speed-up beside it.
"""
import os
import statistics
import time

import pytest
import torch

pytest.importorskip("transformers")

from tiny_qwen_vl import build_qwen_vl  # noqa: E402

import tokenprune  # noqa: E402

SMOKE = os.environ.get("TOKENPRUNE_BENCH_SMOKE", "0") not in ("", "0")
REAL_ON_CPU = os.environ.get("TOKENPRUNE_BENCH_QWEN_7B", "0") not in ("", "0")
RATIOS = (None, 0.25, 0.1)
LAYERS = (None, 7, 15, -1)  # Qwen2.5-VL-7B's full-attention blocks 7, 15 and 31
PROMPT = ("what is the color of the big dog on the left of the picture , and how many people "
          "are there in the middle of it ? describe the sky .")


def batches(on_cuda):
    return (1, 2) if SMOKE else (1, 4) if on_cuda else (1,)


@pytest.fixture(scope="module")
def qwen(env):
    """(model, processor, image, size name), made once."""
    from PIL import Image
    if SMOKE:
        size, dtype, pixels = "tiny", torch.float32, (48, 64)
    elif env.device.type == "cuda" or REAL_ON_CPU:
        size, dtype, pixels = "qwen2.5-vl-7b", torch.bfloat16, (728, 1288)
    else:
        pytest.skip("the Qwen2.5-VL-7B rows run on CUDA, or on the CPU with "
                    "TOKENPRUNE_BENCH_QWEN_7B=1 (about 17 GB of weights)")
    model, processor = build_qwen_vl("qwen2_5_vl", size, seed=0, dtype=dtype, device=env.device)
    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (*pixels, 3), generator=generator,
                                          dtype=torch.uint8).numpy())
    return model, processor, image, size


def prompt_inputs(processor, image, batch, device):
    text = (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    return processor(images=[image] * batch, text=[text] * batch, padding=True,
                     return_tensors="pt").to(device)


@pytest.mark.parametrize("measure", ["ttft", "vision", "lm"])
@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: "unpruned" if r is None else f"r{r}")
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: f"layer{layer}")
def test_qwen_vl(qwen, env, benchmark, measure, ratio, batch, layer):
    if batch not in batches(env.device.type == "cuda"):
        pytest.skip(f"batch {batch} is not run on this device")
    if layer is not None and (ratio is None or (SMOKE and layer != -1)):
        pytest.skip("layer is a pruned provider's (the tiny tower has 2 blocks)")
    model, processor, image, size = qwen
    if ratio is not None:
        tokenprune.prune_image_tokens(model, processor, ratio=ratio, layer=layer)
    try:
        inputs = prompt_inputs(processor, image, batch, env.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        image_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
        inner = model.model

        @torch.no_grad()
        def ttft():
            model(**inputs, logits_to_keep=1)
            env.sync()

        @torch.no_grad()
        def vision():
            inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            env.sync()

        with torch.no_grad():
            positions, _ = inner.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"])
        embeds = torch.randn(*inputs["input_ids"].shape, model.config.text_config.hidden_size,
                             generator=torch.Generator().manual_seed(1)).to(env.device, model.dtype)

        @torch.no_grad()
        def lm():
            inner.language_model(inputs_embeds=embeds, position_ids=positions,
                                 attention_mask=inputs["attention_mask"], use_cache=True)
            env.sync()

        run = dict(ttft=ttft, vision=vision, lm=lm)[measure]
        benchmark.group = f"qwen_vl {size} B={batch}"
        benchmark.extra_info.update(
            kind="qwen_vl", measure=measure, model=size, batch=batch,
            provider="unpruned" if ratio is None else "ours", ratio=ratio, layer=layer,
            image_tokens=image_tokens, prompt_tokens=int(inputs["input_ids"].shape[1]),
            device=env.device_name(), device_type=env.device.type,
            dtype=str(model.dtype).replace("torch.", ""),
            backend=env.resolve("auto") if ratio is not None else None,
            torch_threads=torch.get_num_threads(), versions=env.versions())
        if measure == "ttft":
            benchmark.extra_info["peak_mem_bytes"], benchmark.extra_info[
                "peak_mem_total_bytes"] = env.peak_memory(run)
        rounds, warmup = (1, 0) if SMOKE else (3, 1) if env.device.type == "cpu" else (10, 2)
        timed = []  # the selecting block's pre-hook, per vision run
        if measure == "vision" and layer is not None:
            block = inner.visual.blocks[layer]

            def started(module, args, kwargs):
                env.sync()
                timed.append(-time.perf_counter())

            def done(module, args, kwargs):  # after tokenprune's pre-hook, registered earlier
                env.sync()
                timed[-1] += time.perf_counter()
            timers = [block.register_forward_pre_hook(started, with_kwargs=True, prepend=True),
                      block.register_forward_pre_hook(done, with_kwargs=True)]
        try:
            benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
        finally:
            if timed:
                for timer in timers:
                    timer.remove()
        if timed:
            benchmark.extra_info["selection_s"] = statistics.median(timed[warmup:] or timed)
    finally:
        tokenprune.remove_pruning(model)
