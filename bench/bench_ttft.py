"""A vision-language model's time to first token with fewer image tokens, and the ceiling its
token counts allow: Qwen2.5-VL-7B, Qwen3.5-9B and LLaVA-1.5-7B at their real shapes.

The models come from tools/tiny_qwen_vl.py and tools/tiny_llava.py with random weights (speed
does not depend on them), in bfloat16, with a prompt of about 40 text tokens:
- "qwen2.5-vl-7b": the Qwen2.5-VL-7B-Instruct configuration, one 1288 x 728 image (92 x 52
  patches, 1196 image tokens) per prompt;
- "qwen3.5-9b": the Qwen3.5-9B configuration (a gated-delta-net and full-attention language
  model, a 27-block tower without windows), one 1280 x 736 image (80 x 46 patches of 16 px, 920
  image tokens) per prompt;
- "llava-1.5-7b": the LLaVA-1.5-7B configuration (CLIP ViT-L/14 at 336 px, Vicuna-7B), one
  336 x 336 image (576 image tokens) per prompt.
On CUDA at batch 1 and 4. On the CPU at batch 1 only when TOKENPRUNE_BENCH_QWEN_7B=1,
TOKENPRUNE_BENCH_QWEN35_9B=1 or TOKENPRUNE_BENCH_LLAVA_7B=1 (the weights take about 17, 19 and
14 GB: run one of them alone, with `-k qwen2.5`, `-k qwen3.5` or `-k llava`). With
TOKENPRUNE_BENCH_SMOKE=1 the tiny models at batch 1 and 2.

Providers: "unpruned", and prune_image_tokens at ratio 0.25 and 0.1 (default selection, mmr).
Qwen's are also pruned inside the tower at `layer` 7, 15 and -1 (Qwen2.5-VL-7B's
full-attention blocks 7, 15 and 31; any block of Qwen3.5's tower; the smoke run: -1 only).
Measures, each a pytest-benchmark row with its extra_info:
- ttft: one forward over the prompt with the image, to the first token's logits (the tower,
  the selection, the projector or merger, and the language model's prefill);
- vision: get_image_features alone (the tower and projector; for a pruned provider with the
  selection in it): selection overhead = pruned vision / unpruned vision - 1; a pruned Qwen
  provider also times its selecting block's pre-hook (the selection, and with `layer` the cut)
  inside these runs, extra_info selection_s (median);
- lm: the language model's prefill alone over the prompt's token count for that provider
  (random embeddings at the prompt's positions). It depends on the ratio only, so a provider
  with `layer` does not repeat it: bench/ttft_report.py takes the one without `layer`.
The ceiling of a pruned provider is unpruned ttft / (unpruned vision + lm at the kept count),
and with `layer` unpruned ttft / (its vision - selection_s + lm at the kept count: the first L
blocks on every patch, the rest on the kept ones), from the medians; bench/ttft_report.py
prints each speed-up beside it.
"""
import os
import statistics
import time

import pytest
import torch

pytest.importorskip("transformers")

from tiny_llava import build_llava  # noqa: E402
from tiny_qwen_vl import SIZES as QWEN_SIZES, build_qwen_vl  # noqa: E402

import tokenprune  # noqa: E402

SMOKE = os.environ.get("TOKENPRUNE_BENCH_SMOKE", "0") not in ("", "0")
ON_CPU = {"qwen2.5-vl-7b": "TOKENPRUNE_BENCH_QWEN_7B", "qwen3.5-9b": "TOKENPRUNE_BENCH_QWEN35_9B",
          "llava-1.5-7b": "TOKENPRUNE_BENCH_LLAVA_7B"}
# A Qwen size's image, (height, width): a multiple of its patch size x 2 (14 or 16 px patches).
QWEN_IMAGE = {"qwen2.5-vl-7b": (728, 1288), "qwen3.5-9b": (736, 1280)}
RATIOS = (None, 0.25, 0.1)
LAYERS = (None, 7, 15, -1)  # Qwen2.5-VL-7B's full-attention blocks 7, 15 and 31
PROMPT = ("what is the color of the big dog on the left of the picture , and how many people "
          "are there in the middle of it ? describe the sky .")


def batches(on_cuda):
    return (1, 2) if SMOKE else (1, 4) if on_cuda else (1,)


def random_image(height, width):
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator,
                                         dtype=torch.uint8).numpy())


@pytest.fixture(scope="module", params=list(ON_CPU))
def vlm(request, env):
    """(model, processor, image, size name, prompt text), made once per model."""
    size = request.param
    if not SMOKE and env.device.type != "cuda" and os.environ.get(ON_CPU[size], "0") in ("", "0"):
        pytest.skip(f"the {size} rows run on CUDA, or on the CPU with {ON_CPU[size]}=1")
    dtype = torch.float32 if SMOKE else torch.bfloat16
    if size == "llava-1.5-7b":
        model, processor = build_llava("clip", "tiny" if SMOKE else size, seed=0, dtype=dtype,
                                       device=env.device)
        side = model.config.vision_config.image_size
        text = f"USER: <image>\n{PROMPT} ASSISTANT:"
        return model, processor, random_image(side, side), "tiny llava" if SMOKE else size, text
    family = QWEN_SIZES[size]
    model, processor = build_qwen_vl(family, "tiny" if SMOKE else size, seed=0,
                                     dtype=dtype, device=env.device)
    text = (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    image = random_image(48, 64) if SMOKE else random_image(*QWEN_IMAGE[size])
    return model, processor, image, f"tiny {family}" if SMOKE else size, text


def language_model_positions(model, inputs):
    """The position ids the language model gets for this prompt (Qwen: 3D M-RoPE; LLaVA: None,
    the default 0, 1, ..)."""
    if not hasattr(model.model, "get_rope_index"):
        return None
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"])
    return positions


@pytest.mark.parametrize("measure", ["ttft", "vision", "lm"])
@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: "unpruned" if r is None else f"r{r}")
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: f"layer{layer}")
def test_ttft(vlm, env, benchmark, measure, ratio, batch, layer):
    model, processor, image, size, text = vlm
    qwen = hasattr(model.model, "get_rope_index")
    if batch not in batches(env.device.type == "cuda"):
        pytest.skip(f"batch {batch} is not run on this device")
    if layer is not None and (not qwen or ratio is None or measure == "lm"
                              or (SMOKE and layer != -1)):
        pytest.skip("layer is a pruned Qwen provider's (the tiny tower has 2 blocks), and the "
                    "language model's time does not depend on it")
    if ratio is not None:
        tokenprune.prune_image_tokens(model, processor, ratio=ratio, layer=layer)
    try:
        inputs = processor(images=[image] * batch, text=[text] * batch, padding=True,
                           return_tensors="pt").to(env.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        image_id = model.config.image_token_id
        image_tokens = int((inputs["input_ids"][0] == image_id).sum())
        inner = model.model
        features = dict(pixel_values=inputs["pixel_values"])  # LLaVA: the config's layer
        if qwen:
            features["image_grid_thw"] = inputs["image_grid_thw"]

        @torch.no_grad()
        def ttft():
            model(**inputs, logits_to_keep=1)
            env.sync()

        @torch.no_grad()
        def vision():
            inner.get_image_features(**features)
            env.sync()

        positions = language_model_positions(model, inputs)
        embeds = torch.randn(*inputs["input_ids"].shape, model.config.text_config.hidden_size,
                             generator=torch.Generator().manual_seed(1)).to(env.device, model.dtype)

        @torch.no_grad()
        def lm():
            inner.language_model(inputs_embeds=embeds, position_ids=positions,
                                 attention_mask=inputs["attention_mask"], use_cache=True)
            env.sync()

        run = dict(ttft=ttft, vision=vision, lm=lm)[measure]
        benchmark.group = f"ttft {size} B={batch}"
        benchmark.extra_info.update(
            kind="ttft", measure=measure, model=size, batch=batch,
            provider="unpruned" if ratio is None else "ours", ratio=ratio, layer=layer,
            image_tokens=image_tokens, prompt_tokens=int(inputs["input_ids"].shape[1]),
            device=env.device_name(), device_type=env.device.type,
            dtype=str(model.dtype).replace("torch.", ""),
            backend=env.resolve("auto") if ratio is not None else None,
            torch_threads=torch.get_num_threads(), versions=env.versions())
        if measure == "ttft":
            benchmark.extra_info["peak_mem_bytes"], benchmark.extra_info[
                "peak_mem_total_bytes"] = env.peak_memory(run)
        # The 7B rows on the CPU take 5 to 75 s a run: two rounds after one warm-up.
        rounds, warmup = (1, 0) if SMOKE else (2, 1) if env.device.type == "cpu" else (10, 2)
        timed = []  # the selecting block's pre-hook, per vision run
        if measure == "vision" and ratio is not None and qwen:
            block = inner.visual.blocks[-1 if layer is None else layer]

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
