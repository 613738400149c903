"""`tokenprune eval` and `tokenprune visualize` on timm towers, offline.

ViT-B-16-SigLIP2's tokenizer is Gemma's, which OpenCLIP loads from the Hugging Face hub
(`timm/ViT-B-16-SigLIP2`) through transformers' AutoTokenizer: it cannot be had offline. The
eval test puts a small word-level stand-in tokenizer into a temporary Hugging Face cache under
that repository name (what an offline machine that fetched the tokenizer once looks like to
transformers: one of the two ways tokenprune's error names, HF_HOME; the other, --tokenizer
DIR, is tested in tests/test_cli_messages.py) and runs the real command in a subprocess with
HF_HOME pointing there. The
zero-shot prompts are then tokenized by the stand-in; the image tower, the checkpoint, the
pruning and CLIP_benchmark's evaluation are the real ones.
"""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from tokenprune import pruned_block
from tokenprune.cli import main

timm = pytest.importorskip("timm")

CLASSES = ["red", "green", "blue", "yellow", "purple"]
SIGLIP2_REPO = "timm/ViT-B-16-SigLIP2"


def write_webdataset(root, count=6, size=64):
    """A `wds/NAME` test split of `count` noise images in CLIP_benchmark's layout."""
    rng = np.random.default_rng(0)
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(count):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(png, "png")
            for ext, payload in (("png", png.getvalue()), ("cls", str(i % len(CLASSES)).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "test" / "nshards.txt").write_text("1")
    (root / "classnames.txt").write_text("\n".join(CLASSES))
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.")
    return root


def stand_in_tokenizer(hf_home, repo):
    """A word-level tokenizer in a Hugging Face cache layout, as transformers reads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    revision = "0" * 40
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    words = ["<pad>", "<unk>", "a", "photo", "of", *CLASSES]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "unk_token": "<unk>"}))
    (snapshot / "config.json").write_text("{}")  # AutoTokenizer reads a model config first


def test_eval_siglip2_with_pruning_offline(tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP2", pretrained=None)
    checkpoint = tmp_path / "siglip2.pt"
    torch.save(model.state_dict(), checkpoint)
    del model
    data = write_webdataset(tmp_path / "wds", size=224)
    stand_in_tokenizer(tmp_path / "hf", SIGLIP2_REPO)
    output = tmp_path / "result.json"
    try:
        proc = run_eval_subprocess(data, checkpoint, output, tmp_path / "hf")
    finally:
        checkpoint.unlink()  # 1.5 GB: not left behind in pytest's kept temporary folders
    assert proc.returncode == 0, proc.stderr
    result = json.loads(output.read_text())
    # SigLIP2: no class token, so 196 patches before, 8 + 24 after.
    assert (result["tokens_before"], result["tokens_after"]) == (196, 32)
    assert result["pruning"]["applied"] and result["pruning"]["num_blocks"] == 12
    assert set(result["metrics"]) >= {"acc1", "acc5"}
    assert "196 -> 32 tokens" in proc.stderr


def run_eval_subprocess(data, checkpoint, output, hf_home):
    """The command as a user types it, in a fresh process whose Hugging Face cache is hf_home."""
    return subprocess.run(
        [sys.executable, "-m", "tokenprune.cli", "eval", "--dataset", "wds/tiny", "--dataset_root",
         str(data), "--model", "ViT-B-16-SigLIP2", "--pretrained", str(checkpoint),
         "--enable_pruning", "--k_anchors", "8", "--top_m", "24", "--batch_size", "3",
         "--num_workers", "0", "--output", str(output), "--quiet"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})


# A registered OpenCLIP config per timm family, small enough for the CPU.
TINY_TIMM = {
    # DeiT: class + distillation token (p = 2), timm Block.
    "tokenprune-test-deit": "deit_tiny_distilled_patch16_224",
    # EVA02 tiny: class token, rotary positions, SwiGLU, timm EvaBlock.
    "tokenprune-test-eva02": "eva02_tiny_patch14_224",
}


@pytest.fixture(scope="module")
def tiny_timm_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    for name, trunk in TINY_TIMM.items():
        (root / f"{name}.json").write_text(json.dumps({
            "embed_dim": 32,
            "vision_cfg": {"image_size": 224, "timm_model_name": trunk,
                           "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear"},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 1}}))
    open_clip.add_model_config(root)
    return list(TINY_TIMM)


@pytest.mark.parametrize("name", list(TINY_TIMM))
def test_visualize_on_timm_towers(tiny_timm_configs, name, tmp_path, capsys, monkeypatch):
    from tokenprune.cli import visualize
    seen = {}
    kept_tokens = visualize.kept_tokens

    def spy(model, pixels):
        keep, anchors = kept_tokens(model, pixels)
        seen.update(keep=keep, anchors=anchors, block=pruned_block(model))
        return keep, anchors

    monkeypatch.setattr(visualize, "kept_tokens", spy)
    out = tmp_path / "kept.png"
    status = main(["visualize", "--model", name, "--k_anchors", "5", "--top_m", "15",
                   "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert status == 0, err
    block = seen["block"]
    p = block.num_prefix
    grid = 14 if name.endswith("deit") else 16
    assert p == (2 if name.endswith("deit") else 1)
    # 1-based patch numbers: the kept token indices shifted past the prefix tokens.
    assert seen["keep"] == (block.last_keep_idx[0] - p + 1).tolist()
    assert set(seen["anchors"]) <= set(seen["keep"]) and len(seen["anchors"]) == 5
    assert all(1 <= n <= grid * grid for n in seen["keep"])
    assert f"{grid * grid + p} -> {20 + p} tokens" in stdout
    assert out.exists()


def test_eval_refuses_a_convnext_tower_before_loading(tmp_path, capsys):
    root = write_webdataset(tmp_path / "wds")  # the dataset's folder is checked first
    status = main(["eval", "--dataset", "wds/tiny", "--dataset_root", str(root),
                   "--model", "convnext_base", "--pretrained", "laion400m_s13b_b51k",
                   "--enable_pruning", "--output", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert status == 1
    assert ("--enable_pruning: convnext_base has a timm convnext_base image tower (from "
            "timm.models.convnext), which cannot be pruned") in err
    assert "timm Eva" in err  # the supported families are listed
    assert not (tmp_path / "out.json").exists()
