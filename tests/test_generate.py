"""`tokenprune generate` on a tiny LLaVA saved offline (tools/tiny_llava.py), and that builder."""
import os

import pytest
import torch
from PIL import Image

from helpers import run_main
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


def test_llava_1_5_7b_configuration_has_its_shapes():
    """The GPU benchmark's model: LLaVA-1.5-7B's shapes (7.06 B parameters, as
    llava-hf/llava-1.5-7b-hf), built on the meta device so that nothing is allocated."""
    model, processor = build_llava("clip", "llava-1.5-7b", device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 7.06
    assert model.dtype == torch.float16 and model.config.image_seq_length == 576
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert processor.image_processor.crop_size == {"height": 336, "width": 336}


# ----- tokenprune generate -------------------------------------------------------------------



def answers_of(out, label):
    """The answers printed under the line that starts with `label`: {image names: answer}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(label))
    found = {}
    for line in lines[start + 1:]:
        if not line.startswith("  ["):
            break
        names, _, answer = line.strip()[1:].partition("] ")
        found[names] = answer
    return lines[start], found


def library_answers(folder, images, prompt, max_new_tokens, **pruning):
    """What the library itself answers, for the command's output to be checked against."""
    import tokenprune
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    if pruning:
        tokenprune.prune_image_tokens(model, processor, **pruning)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True)
    inputs = processor(images=images, text=[text] * len(images), padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return ([answer.strip() for answer in processor.batch_decode(new, skip_special_tokens=True)],
            model.config.image_seq_length)


def test_generate_compare_prints_both_answers_and_token_counts(llava_dir, tmp_path, capsys):
    flipped = tmp_path / "flipped.png"
    image = Image.open(SAMPLE).convert("RGB")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    status, out, err = run_main(
        ["generate", "--model", llava_dir, "--image", SAMPLE, "--image", str(flipped),
         "--prompt", "what is in the picture ?", "--k-anchors", "3", "--top_m", "5",
         "--max_new_tokens", "4", "--backend", "reference", "--compare"], capsys)
    assert status == 0, err
    unpruned_line, unpruned = answers_of(out, "unpruned:")
    pruned_line, pruned = answers_of(out, "pruned (k_anchors 3, top_m 5")
    # 16 patches (the class token dropped by "default") before, k + m = 8 after.
    assert "16 image tokens per image; batch 2" in unpruned_line
    assert "16 -> 8 image tokens per image; batch 2" in pruned_line
    for line in (unpruned_line, pruned_line):
        assert "time to first token" in line and "tokens/s" in line
    assert "speed-up over unpruned" in pruned_line
    images = [image, Image.open(flipped).convert("RGB")]
    expected, _ = library_answers(llava_dir, images, "what is in the picture ?", 4)
    assert list(unpruned.values()) == expected
    expected, seq = library_answers(llava_dir, images, "what is in the picture ?", 4,
                                    k_anchors=3, top_m=5, backend="reference")
    assert seq == 8 and list(pruned.values()) == expected
    assert list(pruned) == list(unpruned) == ["sample.png", "flipped.png"]
    assert "LLaVA with a clip_vision_model tower, 16 image tokens per image, on cpu" in err


def test_generate_without_compare_runs_the_pruned_model_only(llava_dir, capsys):
    status, out, err = run_main(["generate", "--model", llava_dir, "--image", SAMPLE,
                                 "--prompt", "red ?", "--max_new_tokens", "2", "--top_m", "2"],
                                capsys)
    assert status == 0, err
    assert not any(line.startswith("unpruned") for line in out.splitlines())
    line, answers = answers_of(out, "pruned (k_anchors 10, top_m 2")
    assert "16 -> 12 image tokens per image; batch 1" in line
    assert "over unpruned" not in line and list(answers) == ["sample.png"]


@pytest.mark.parametrize("compare", [False, True])
def test_generate_with_nothing_to_prune_says_so(llava_dir, capsys, compare):
    """k_anchors + top_m (10 + 54) covers the 16 patches: one run, said to be unpruned, and no
    speed-up between a model and itself."""
    status, out, err = run_main(["generate", "--model", llava_dir, "--image", SAMPLE,
                                 "--prompt", "red ?", "--max_new_tokens", "1"]
                                + ["--compare"] * compare, capsys)
    assert status == 0, err
    warned = [line for line in err.splitlines() if "nothing to prune" in line]
    assert len(warned) == 1 and warned[0].startswith("tokenprune: warning: ")
    assert "Warning" not in err  # no Python warning lines
    line, answers = answers_of(out, "unpruned")
    assert "16 image tokens per image; batch 1" in line and list(answers) == ["sample.png"]
    assert len(out.splitlines()) == 3, out  # the answer once, whatever --compare
    assert "nothing was pruned (k_anchors + top_m = 64" in out
    assert "->" not in out and "speed-up" not in out and not out.startswith("pruned")


def test_generate_ratio_and_selection(llava_dir, capsys):
    status, out, err = run_main(["generate", "--model", llava_dir, "--image", SAMPLE,
                                 "--prompt", "red ?", "--max_new_tokens", "2", "--ratio", "0.5",
                                 "--selection", "cls", "--backend", "reference"], capsys)
    assert status == 0, err
    line, answers = answers_of(out, "pruned (ratio 0.5, cls)")
    assert "16 -> 8 image tokens per image; batch 1" in line
    expected, seq = library_answers(llava_dir, [Image.open(SAMPLE).convert("RGB")], "red ?", 2,
                                    ratio=0.5, selection="cls", backend="reference")
    assert seq == 8 and list(answers.values()) == expected


@pytest.mark.parametrize("flags, says", [
    (["--ratio", "0.5", "--top_m", "3"], "top_m=3 and ratio=0.5 were both given"),
    (["--ratio", "1.5"], "ratio must be a number in (0, 1]"),
    (["--mmr_lambda", "2"], "mmr_lambda must be a finite number in [0, 1]"),
])
def test_generate_bad_ratio_and_selection_values_before_loading(flags, says, capsys):
    status, _, err = run_main(["generate", "--model", "llava-hf/llava-1.5-7b-hf", "--image",
                               SAMPLE, "--prompt", "red ?", *flags], capsys)
    assert status == 1 and says in err and len(err.strip().splitlines()) == 1


def test_prompts_use_the_chat_template_or_an_image_token(llava_dir):
    from transformers import AutoProcessor

    from tokenprune.cli import CLIError
    from tokenprune.cli.generate import prompts
    processor = AutoProcessor.from_pretrained(llava_dir)
    texts, per_answer = prompts(processor, "red ?", 3)
    assert per_answer == 1 and texts == ["USER: <image>\nred ? ASSISTANT:"] * 3
    # A prompt written with its own image tokens is kept as written, images grouped by it.
    texts, per_answer = prompts(processor, "<image> <image> same ?", 4)
    assert per_answer == 2 and texts == ["<image> <image> same ?"] * 2
    with pytest.raises(CLIError, match="go 2 to an answer, but 3 --image"):
        prompts(processor, "<image> <image> same ?", 3)
    processor.chat_template = None
    assert prompts(processor, "red ?", 1) == (["<image>\nred ?"], 1)


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory, llava_dir):
    """Folders that are not a usable LLaVA: another model type, and weights without a processor."""
    import json
    import shutil
    root = tmp_path_factory.mktemp("bad")
    (root / "next").mkdir()
    (root / "next" / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    shutil.copytree(llava_dir, root / "no_processor")
    for name in os.listdir(root / "no_processor"):
        if name not in ("config.json", "generation_config.json", "model.safetensors"):
            os.remove(root / "no_processor" / name)
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("argv, status, message", [
    (["--image", "missing.png"], 1, "--image missing.png: no such file"),
    (["--image", "{bad}"], 1, "--image {bad}: a folder, not an image file"),
    (["--alpha", "1.5"], 1, "--alpha must be a finite number in [0, 1], got 1.5"),
    (["--k_anchors", "0"], 1, "--k_anchors must be an integer >= 1, got 0"),
    (["--max_new_tokens", "0"], 1, "--max_new_tokens must be an integer >= 1, got 0"),
    (["--score_norm", "max"], 2, "argument --score_norm: invalid choice: 'max'"),
    (["--model", "./no/such/folder"], 1, "--model ./no/such/folder: no such folder"),
    (["--model", "{bad}/empty"], 1, "no config.json in this folder"),
    (["--model", "{bad}/next"], 1, "is a 'llava_next' model, not LLaVA or Qwen-VL; tokenprune "
                                   "generate runs LLaVA-1.5 (llava), Qwen2-VL (qwen2_vl)"),
    (["--prompt", " "], 1, "--prompt is empty"),
])
def test_generate_bad_input_is_one_line_before_loading(llava_dir, bad_folders, monkeypatch,
                                                       capsys, argv, status, message):
    from tokenprune.cli import generate
    monkeypatch.setattr(generate, "load", lambda *a: pytest.fail("loaded a model"))
    given = {"--model": llava_dir, "--image": SAMPLE, "--prompt": "red ?"}
    given.update({flag: value.format(bad=bad_folders) for flag, value in zip(argv[::2],
                                                                           argv[1::2])})
    code, out, err = run_main(["generate", *[x for pair in given.items() for x in pair]],
                              capsys)
    assert code == status
    assert len(err.strip().splitlines()) == 1 and message.format(bad=bad_folders) in err, err
    assert out == "" and "Traceback" not in err


def test_generate_folder_without_processor_is_one_line(bad_folders, capsys):
    code, out, err = run_main(["generate", "--model", str(bad_folders / "no_processor"),
                               "--image", SAMPLE, "--prompt", "red ?"], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"tokenprune: error: --model {bad_folders / 'no_processor'}: could not "
                          "load its processor from the folder"), err


def test_generate_unreadable_image_is_one_line(llava_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code, _, err = run_main(["generate", "--model", llava_dir, "--image", str(broken),
                             "--prompt", "red ?"], capsys)
    assert code == 1
    assert err.strip() == (f"tokenprune: error: --image {broken}: not an image file that PIL "
                           "can read (UnidentifiedImageError)")


def test_generate_hub_id_offline_is_one_line(capsys):
    """HF_HUB_OFFLINE=1 (tests/conftest.py) and nothing cached: the config cannot be fetched."""
    code, out, err = run_main(["generate", "--model", "tokenprune-tests/no-such-llava",
                               "--image", SAMPLE, "--prompt", "red ?"], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("tokenprune: error: --model tokenprune-tests/no-such-llava: could not "
                          "load its config from the hub"), err
