"""`tokenprune generate` on a tiny LLaVA saved offline (tools/tiny_llava.py), and that builder."""
import os

import pytest
import torch
from PIL import Image

from tiny_llava import build_llava, save_llava

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenprune",
                      "assets", "sample.png")
PROMPT = "USER: <image>\nwhat is in the picture ? ASSISTANT:"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny CLIP-tower LLaVA (16 patches) saved with save_pretrained, once per module."""
    return save_llava(str(tmp_path_factory.mktemp("tiny_llava")), "clip", "tiny", seed=0)


def test_saved_tiny_llava_loads_back_offline_and_generates_as_built(llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    built, built_processor = build_llava("clip", "tiny", seed=0)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    image = Image.open(SAMPLE).convert("RGB")
    inputs = processor(images=[image, image.rotate(90)], text=[PROMPT, "USER: <image>\nred ?"],
                       padding=True, return_tensors="pt")
    # 16 patches of 8 px in a 32-px image, the class token dropped ("default"): 16 placeholders.
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert placeholders.tolist() == [model.config.image_seq_length] * 2 == [16, 16]
    assert inputs["attention_mask"][1].sum() < inputs["attention_mask"][0].sum()  # padded
    assert torch.equal(inputs["input_ids"], built_processor(
        images=[image, image.rotate(90)], text=[PROMPT, "USER: <image>\nred ?"], padding=True,
        return_tensors="pt")["input_ids"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected = built.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out, expected)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                     skip_special_tokens=True)
    assert all(answer.strip() for answer in answers)


@pytest.mark.parametrize("vision, rows", [("clip", 16), ("siglip", 15)])
def test_tiny_llava_counts_image_tokens_as_transformers_does(vision, rows):
    """CLIP: 16 patches after the dropped class token; SigLIP has no class token, so "default"
    drops a patch (SPEC's edge case): 15. The model's features must fill exactly that many."""
    model, processor = build_llava(vision, "tiny")
    assert model.config.image_seq_length == rows
    image = Image.open(SAMPLE).convert("RGB")
    inputs = processor(images=image, text="USER: <image>\nred ?", return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == rows
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = getattr(features, "pooler_output", features)
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    assert features.reshape(-1, features.shape[-1]).shape[0] == rows
