"""`tokenprune visualize --schedule`: one panel per stage, each with the patches kept after that
stage in the original numbering, checked against the same model patched by hand. Offline: the
small ViT shipped with the package, and the tiny OpenCLIP ViT of tests/helpers.py."""
import open_clip
import pytest
import torch
from PIL import Image

from tokenprune import pruned_blocks, replace_last_block
from tokenprune.cli import visualize

from helpers import TINY, run_main


@pytest.fixture
def drawn(monkeypatch):
    """What draw_stages returned, per call."""
    results = []
    draw_stages = visualize.draw_stages
    monkeypatch.setattr(visualize, "draw_stages",
                        lambda *args: results.append(draw_stages(*args)) or results[-1])
    return results


def expected_stages(model, pixels, schedule, selection="score"):
    """Each stage's kept patches (1-based, original numbering) of `model` patched here."""
    replace_last_block(model, schedule=schedule, selection=selection)
    with torch.no_grad():
        getattr(model, "encode_image", model)(pixels)
    return [(block.last_keep_idx[0] - block.num_prefix + 1).tolist()
            for block in pruned_blocks(model)]


def check_stages(stages, expected, ks):
    assert [stage["keep"] for stage in stages] == expected
    for (before, after) in zip(stages, stages[1:]):
        assert set(after["keep"]) < set(before["keep"])
        assert set(after["anchors"]) <= set(before["keep"])
    for stage, k in zip(stages, ks):  # each stage's anchors, in the original numbering
        assert len(stage["anchors"]) == k and set(stage["anchors"]) <= set(stage["keep"])


def test_shipped_model_draws_a_panel_per_stage(tmp_path, capsys, drawn):
    from tokenprune.proxy import demo_inputs
    out = tmp_path / "stages.png"
    status, stdout, err = run_main(["visualize", "--schedule", "1:4:20,3:2:10", "--out",
                                    str(out)], capsys)
    assert status == 0, err
    (result,) = drawn
    assert [stage["block"] for stage in result["stages"]] == [1, 3]
    model, pixels, *_ = demo_inputs()
    check_stages(result["stages"], expected_stages(model, pixels, [(1, 4, 20), (3, 2, 10)]),
                 [4, 2])
    assert [len(panel.keep) for panel in result["panels"]] == [24, 12]
    assert result["panels"][1].heading == "stage 2: block 4 of 4 (index 3)\nkeeps 12 of 24 patches"
    geo = visualize.layout(128, 128, 2, visualize.COMPARE_PANEL, True)
    assert Image.open(out).size == geo["size"]
    assert "shipped ViT: 65 -> 25 -> 13 tokens at blocks 2, 4 of 4 (a schedule)" in stdout
    assert "  stage 2 at block 4 of 4 (index 3): CLS + 2 anchors + 10 kept by score, of the 24 " \
           "patches that reach it" in stdout
    assert "prediction:" in stdout


def test_tiny_model_stages_and_a_three_panel_figure(tiny, tmp_path, capsys, drawn):
    """mmr on the sample image: its stages' patches and anchors, in the original numbering."""
    out = tmp_path / "stages.png"
    status, _, err = run_main(["visualize", "--model", TINY, "--pretrained", tiny["checkpoint"],
                               "--schedule", "0:5:19,1:3:5", "--selection", "mmr", "--out",
                               str(out)], capsys)
    assert status == 0, err
    model, _, preprocess = open_clip.create_model_and_transforms(TINY,
                                                                 pretrained=tiny["checkpoint"])
    pixels = preprocess(Image.open(visualize.sample_image_path()).convert("RGB")).unsqueeze(0)
    check_stages(drawn[0]["stages"], expected_stages(model.eval(), pixels,
                                                     [(0, 5, 19), (1, 3, 5)], "mmr"), [5, 3])
    assert Image.open(out).size == visualize.layout(32, 32, 2, visualize.COMPARE_PANEL,
                                                    True)["size"]


def test_one_stage_schedule_is_the_single_cut_picture(tmp_path, capsys, drawn):
    outs = [tmp_path / "schedule.png", tmp_path / "cut.png"]
    for out, flags in zip(outs, (["--schedule", "3:4:12"], ["--selection", "score"])):
        status, _, err = run_main(["visualize", *flags, "--out", str(out)], capsys)
        assert status == 0, err
    assert drawn == [] and outs[0].read_bytes() == outs[1].read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "1:4:20,3:2:10", "--top_m", "3"],
     "--schedule gives every stage's block and counts: leave out --top_m 3"),
    (["--schedule", "1:4:20,4:2:10"], "--schedule stage 2 layer must be in [-4, 3] for this "
                                      "4-block tower, got 4"),
])
def test_bad_schedules_are_one_line(tmp_path, capsys, flags, message):
    status, _, err = run_main(["visualize", *flags, "--out", str(tmp_path / "x.png")], capsys)
    assert status == 1 and message in err and len(err.strip().splitlines()) <= 3, err
    assert err.strip().splitlines()[-1].startswith("tokenprune: error: ")
