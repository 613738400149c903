"""What the commands tell people: the text tokenizer a model fetches from the Hugging Face hub
(and --tokenizer DIR offline), advice that holds on this machine (--no_amp, pretrained tags, the
nothing-to-prune warning), `eval --help` and `sweep --help` without importing torch, and the
shipped model's prediction before and after pruning. Offline."""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tokenprune.cli import checks, clip_benchmark_flags, evaluate, loading, model_checks  # noqa: E402
from tokenprune.vlm.families import FAMILIES  # noqa: E402

from helpers import CLASSES, TINY, TINY_CFG, run_main  # noqa: E402

HF_TOKENIZED = "tokenprune-test-hf-tokenizer"
TOKENIZER_HUB_ID = "tokenprune-test/no-such-tokenizer"  # not on the hub, not in any cache




def data_args(tiny, model=TINY):
    return ["--dataset", "wds/tiny", "--dataset_root", tiny["data"], "--model", model,
            "--pretrained", tiny["checkpoint"], "--batch_size", "8", "--num_workers", "0"]




# ----- point 4: a text tokenizer from the Hugging Face hub, offline -----------------------

@pytest.fixture(scope="module")
def hf_tokenized(tiny, tmp_path_factory):
    """The tiny architecture with a Hugging Face text tokenizer (as SigLIP's configs name one),
    and that tokenizer saved to a folder: (model name, tokenizer folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("hf_tokenizer")
    config = {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"],
                                       "hf_tokenizer_name": TOKENIZER_HUB_ID}}
    (root / "configs").mkdir()
    (root / "configs" / f"{HF_TOKENIZED}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "configs")
    words = ["<pad>", "<unk>", "a", "photo", "of", "thing", *CLASSES]
    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                            unk_token="<unk>"))
    vocabulary.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = root / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return HF_TOKENIZED, str(folder)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_missing_hub_tokenizer_is_named_before_loading(tiny, hf_tokenized, tmp_path, capsys,
                                                       no_loading, empty_hf_cache, command):
    model, _ = hf_tokenized
    out = (["--output", str(tmp_path / "out.json")] if command == "eval" else
           ["--output_dir", str(tmp_path / "out")])
    status, _, err = run_main([command, *data_args(tiny, model), "--enable_pruning"
                               if command == "eval" else "--no_speed", *out], capsys)
    assert status == 1
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"tokenprune: error: the text tokenizer of {model} is missing")
    assert f"Hugging Face hub as {TOKENIZER_HUB_ID}" in line
    for way in ("HF_HOME", "--tokenizer DIR", "save_pretrained"):
        assert way in line, way
    assert "could not load model" not in line


def test_missing_hub_tokenizer_after_loading_blames_the_tokenizer(tiny, hf_tokenized, tmp_path,
                                                                  capsys, empty_hf_cache,
                                                                  monkeypatch):
    """Online as far as the flags know (HF_HUB_OFFLINE unset), but no hub to reach: the failure
    comes from OpenCLIP's get_tokenizer, after the model loaded; it is named the same way."""
    import huggingface_hub.constants
    model, _ = hf_tokenized
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_checks, "tokenizer_cached", lambda hub_id: True)  # the check passes

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    import transformers
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    status, _, err = run_main(["eval", *data_args(tiny, model), "--output",
                               str(tmp_path / "out.json")], capsys)
    assert status == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"tokenprune: error: the text tokenizer of {model} is missing")
    assert TOKENIZER_HUB_ID in line and "--tokenizer DIR" in line


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_tokenizer_folder_works_offline(tiny, hf_tokenized, tmp_path, capsys, empty_hf_cache,
                                        command):
    model, folder = hf_tokenized
    if command == "eval":
        argv = ["eval", *data_args(tiny, model), "--tokenizer", folder, "--quiet",
                "--output", str(tmp_path / "out.json")]
    else:
        argv = ["sweep", *data_args(tiny, model), "--tokenizer", folder, "--k_anchors", "4",
                "--top_m", "12", "--alpha", "0.5", "--controls", "none", "--no_speed",
                "--output_dir", str(tmp_path / "out")]
    status, _, err = run_main(argv, capsys)
    assert status == 0, err
    results = (tmp_path / "out.json") if command == "eval" else (tmp_path / "out" / "results.json")
    assert results.exists()


def test_tokenizer_flag_on_a_model_without_one_is_refused(tiny, tmp_path, capsys, no_loading):
    status, _, err = run_main(["eval", *data_args(tiny), "--tokenizer", str(tmp_path),
                               "--output", str(tmp_path / "out.json")], capsys)
    assert status == 1
    assert f"--tokenizer {tmp_path}: {TINY} does not load its tokenizer from the Hugging Face " \
        "hub" in err


# ----- point 6: advice that holds here ---------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_no_amp_advice_only_without_native_bfloat16(tiny, tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(evaluate, "cpu_has_native_bfloat16", lambda: native)
    status, _, err = run_main(["eval", *data_args(tiny), "--quiet", "--output",
                               str(tmp_path / "out.json")], capsys)
    assert status == 0, err
    advice = [line for line in err.splitlines() if "--no_amp" in line]
    assert len(advice) == (0 if native else 1), err


@pytest.mark.parametrize("flags, native", [
    ("fpu sse2 avx2 avx512f avx512_bf16 amx_tile", True),
    ("fpu sse2 avx2 amx_bf16 amx_tile", True),
    ("fpu sse2 avx2 avx512f avx512bw", False),
])
def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                       f"flags\t\t: {flags}\n")
    assert checks.cpu_has_native_bfloat16(str(cpuinfo)) is native


def test_random_weights_note_suggests_the_models_own_tags(tmp_path, capsys, no_loading):
    status, _, err = run_main(["visualize", "--model", "EVA02-B-16", "--out",
                               str(tmp_path / "x.png")], capsys)
    assert status == 1 and "a model was loaded" in err  # the note comes first
    tags = open_clip.list_pretrained_tags_by_model("EVA02-B-16")
    assert tags and "openai" not in tags
    assert f"--pretrained {tags[0]}" in err and "--pretrained openai" not in err


@pytest.mark.parametrize("patches", [16, 49, 64, 196, 576])
def test_nothing_to_prune_warning_suggests_what_prunes(patches):
    text = evaluate.nothing_to_prune_warning("ViT-B-16", (224, 224), patches, patches)
    assert f"k_anchors + top_m = {patches} >= {patches} patches of ViT-B-16" in text
    assert "e.g. ViT-B-16" not in text and text.count("ViT-B-16") == 1
    words = text.split()
    k = int(words[words.index("--k_anchors") + 1])
    m = int(words[words.index("--top_m") + 1].rstrip(",);"))
    assert k >= 1 and m >= 0 and k + m < patches


# ----- point 9: help without importing torch ------------------------------------------------

FAST_CHECK = r"""
import json, sys
from tokenprune.cli import main
try:
    status = main(json.loads(sys.argv[1]))
except SystemExit as exc:
    status = exc.code
heavy = sorted(m for m in ("torch", "open_clip", "clip_benchmark") if m in sys.modules)
print(json.dumps({"status": status, "heavy": heavy}))
"""


@pytest.mark.parametrize("command, shown", [
    ("eval", ["--dataset_root", "dataset root folder where the datasets are downloaded",
              "--pretrained_model", "--no_amp", "turn off mixed precision", "--k_anchors",
              "--enable_pruning", "--tokenizer", "--verbose", "tokenprune:proxy-vit-large",
              "tokenprune:digits-large"]),
    ("sweep", ["--dataset", "--dataset_root", "--model", "--pretrained", "--batch_size",
               "--num_workers", "--no_amp", "--tokenizer", "--k_anchors", "--controls",
               "--overwrite"]),
])
def test_help_lists_the_flags_without_importing_torch(tmp_path, command, shown):
    proc = subprocess.run([sys.executable, "-c", FAST_CHECK, json.dumps([command, "--help"])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    *help_text, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == {"status": 0, "heavy": []}, proc.stderr
    text = " ".join(" ".join(help_text).split())  # argparse wraps lines
    for flag in shown:
        assert flag in text, flag


def test_copy_of_clip_benchmark_help_matches_its_parser(monkeypatch):
    import argparse
    from clip_benchmark import cli as cb_cli
    monkeypatch.setattr(sys, "argv", ["clip_benchmark"])
    parser, _ = cb_cli.get_parser_args()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    theirs = {action.option_strings[0]: action.help
              for action in subparsers.choices["eval"]._actions
              if not isinstance(action, argparse._HelpAction)}
    assert theirs == clip_benchmark_flags.EVAL_HELP


# ----- point 10: the demo shows its claim --------------------------------------------------

def test_visualize_shows_the_prediction_before_and_after_pruning(tmp_path, capsys, monkeypatch):
    from tokenprune import remove_pruning, replace_last_block
    from tokenprune.proxy import demo_inputs
    model, pixels, _, label, _ = demo_inputs()
    after = {}
    with torch.no_grad():
        before = int(model(pixels).argmax(-1))
        for selection in ("score", "cls", "mmr"):
            replace_last_block(model, k_anchors=4, top_m=12, selection=selection)
            after[selection] = int(model(pixels).argmax(-1))
            remove_pruning(model)
    monkeypatch.chdir(tmp_path)
    status, stdout, err = run_main(["visualize", "--selection", "score"], capsys)
    assert status == 0, err
    assert (f"prediction: {before} before pruning, {after['score']} after pruning (true label "
            f"{label})" in stdout)
    status, stdout, err = run_main(["visualize"], capsys)  # the demo: three selections
    assert status == 0, err
    assert f"prediction {before} unpruned (true label {label})" in stdout
    predictions = {line.split()[0].rstrip(":"): int(line.rsplit("; prediction ", 1)[1])
                   for line in stdout.splitlines() if line.startswith("  ")}
    assert predictions == after


# ----- torch and torchvision builds that do not match ----------------------------------------

# What `import torchvision` raises when its compiled operators do not fit the installed torch
# (as a half-finished CPU-wheel install can leave them); simulated, the venv stays as it is.
NMS_MISSING = "operator torchvision::nms does not exist"


def import_torchvision_fails():
    try:
        raise RuntimeError(NMS_MISSING)  # the error inside torchvision's import
    except RuntimeError as err:
        raise ImportError("open_clip needs torchvision") from err  # a wrapper does not hide it


def test_torch_torchvision_mismatch_at_import_is_one_line(monkeypatch, capsys):
    """The command modules import open_clip, which imports torchvision: one line that says the
    builds do not match, the installed versions, and the pip line that puts them together."""
    from importlib import metadata

    from tokenprune import cli
    monkeypatch.setattr(cli, "_run", lambda *args: import_torchvision_fails())
    status, out, err = run_main(["eval", "--dataset", "cifar10", "--model", "ViT-B-32"], capsys)
    torch_version, vision = metadata.version("torch"), metadata.version("torchvision")
    series = ".".join(vision.split("+")[0].split(".")[:2])  # the venv's pair matches
    assert status == 1 and out == ""
    assert err.strip().splitlines() == [
        f"tokenprune: error: torch {torch_version} and torchvision {vision} are builds that do "
        f"not match (torchvision's compiled operators do not load: {NMS_MISSING}); reinstall "
        f"the two together, from one index: pip install --force-reinstall "
        f"torch=={torch_version.split('+')[0]} \"torchvision=={series}.*\""], err
    # TOKENPRUNE_DEBUG=1: the traceback, then the same line.
    monkeypatch.setenv("TOKENPRUNE_DEBUG", "1")
    status, _, err = run_main(["eval", "--dataset", "cifar10", "--model", "ViT-B-32"], capsys)
    assert status == 1 and "Traceback" in err and NMS_MISSING in err
    assert err.strip().splitlines()[-1].startswith("tokenprune: error: torch ")


@pytest.mark.parametrize("installed, pip", [
    ({"torch": "2.14.1+cpu", "torchvision": "0.29.1"},
     "torch==2.14.1 \"torchvision==0.29.*\" --index-url https://download.pytorch.org/whl/cpu"),
    ({"torch": "2.9.0+cu128", "torchvision": "0.24.0+cpu"},
     "torch==2.9.0 \"torchvision==0.24.*\" --index-url https://download.pytorch.org/whl/cu128"),
    ({"torch": "2.9.0", "torchvision": None}, "torch==2.9.0 \"torchvision==0.24.*\""),
])
def test_mismatch_names_the_builds_and_the_index(tiny, tmp_path, capsys, monkeypatch,
                                                 installed, pip):
    """Raised while the model loads (inside the loading-error translation): the same line, with
    the torchvision series made for the installed torch (0.(minor + 15) for torch 2.x) and the
    index of torch's own build."""
    monkeypatch.setattr(loading, "installed_version", installed.get)
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *args, **kwargs: import_torchvision_fails())
    # --no_amp: on a CPU without native bfloat16 the advice to add it is a line of its own.
    status, out, err = run_main(["eval", *data_args(tiny), "--no_amp", "--output",
                                 str(tmp_path / "r.json")], capsys)
    vision = installed["torchvision"] or "(not installed)"
    assert status == 1 and "Traceback" not in out + err  # CLIP_benchmark's own lines on stdout
    assert err.strip() == (
        f"tokenprune: error: torch {installed['torch']} and torchvision {vision} are builds "
        f"that do not match (torchvision's compiled operators do not load: {NMS_MISSING}); "
        f"reinstall the two together, from one index: pip install --force-reinstall {pip}")


def test_generate_names_the_mismatch_too(tmp_path, capsys, monkeypatch):
    """transformers imports torchvision for its image processors, while generate loads."""
    import transformers
    from tiny_llava import save_llava
    folder = save_llava(str(tmp_path / "llava"), "clip", "tiny", seed=0)
    capsys.readouterr()  # the saving's progress bars
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda *args, **kwargs: import_torchvision_fails())
    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "tokenprune", "assets", "sample.png")
    status, _, err = run_main(["generate", "--model", folder, "--image", sample,
                               "--prompt", "red ?"], capsys)
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "are builds that do not match" in err and "pip install --force-reinstall" in err


# ----- issue 28, a new user's findings: visualize says what it did -------------------------

@pytest.fixture
def drawn_panels(monkeypatch):
    """The arguments of every render_panels call of visualize (the figure's title, panels and
    caption)."""
    from tokenprune.cli import visualize
    calls = []
    render_panels = visualize.render_panels
    monkeypatch.setattr(visualize, "render_panels",
                        lambda *args: calls.append(args) or render_panels(*args))
    return calls


def test_visualize_demo_with_nothing_to_prune_says_so_everywhere(tmp_path, capsys, drawn_panels):
    """k + m >= the 64 patches: no "pruned at block 4 of 4" title, no "most of any 70 kept
    patches" caption, no anchors: every patch is kept, and the picture and lines say so."""
    status, stdout, err = run_main(["visualize", "--k_anchors", "60", "--top_m", "10", "--out",
                                    str(tmp_path / "kept.png")], capsys)
    assert status == 0, err
    (_, _, panels, title, _, _, caption, _), = drawn_panels
    assert "nothing pruned: k_anchors + top_m = 70 >= 64 patches, all 64 kept" in title
    assert "pruned at" not in title
    assert caption[0].startswith("Nothing is pruned: k_anchors + top_m = 70 >= the 64 patches, "
                                 "so every selection keeps all 64")
    assert "most of any" not in " ".join(caption)
    assert all(len(panel.keep) == 64 and panel.anchors == [] for panel in panels)
    assert "shipped ViT: nothing pruned, all 65 tokens kept (k_anchors + top_m = 70 >= 64 " \
           "patches)" in stdout
    selection_lines = [line for line in stdout.splitlines() if line.startswith("  ")]
    assert len(selection_lines) == 3
    assert all("all 64 patches kept" in line and "anchors" not in line
               for line in selection_lines)
    assert "at block" not in stdout + err


def test_visualize_takes_the_shipped_models_by_name(tmp_path, capsys, drawn_panels):
    """--model tokenprune:proxy-vit-large draws the large-digit model on its own held-out
    canvas, with a caption true of it (its digit covers more patches than are kept)."""
    status, stdout, err = run_main(["visualize", "--model", "tokenprune:proxy-vit-large",
                                    "--out", str(tmp_path / "large.png")], capsys)
    assert status == 0, err
    assert "held-out accuracy 86.3%" in stdout  # the large model's card
    assert "tokenprune:proxy-vit-large: 65 -> 17 tokens at block 4 of 4 (index 3)" in stdout
    (_, _, panels, title, _, _, caption, _), = drawn_panels
    assert "tokenprune:proxy-vit-large (trained)" in title
    digit = int(caption[0].split(" of the 64 patches")[0].rsplit(" ", 1)[1])
    assert digit > 16 and "background" not in " ".join(caption)
    # --model tokenprune:proxy-vit is the demo's own model: the same canvas and tokens kept.
    said = []
    for flags in ([], ["--model", "tokenprune:proxy-vit"]):
        out = tmp_path / f"small{len(flags)}.png"
        status, stdout, err = run_main(["visualize", "--selection", "cls", "--out", str(out),
                                        *flags], capsys)
        assert status == 0, err
        said.append(stdout.replace(str(out), "OUT"))
    assert said[1] == said[0].replace("shipped ViT:", "tokenprune:proxy-vit:")


@pytest.mark.parametrize("flags, message", [
    (["--model", "tokenprune:proxy-vit", "--image", "x.png"],
     "--image x.png: tokenprune:proxy-vit reads its own held-out digit canvases only"),
    (["--model", "tokenprune:proxy-vit-large", "--pretrained", "openai"],
     "--pretrained openai: tokenprune:proxy-vit-large brings its own trained weights"),
    (["--model", "tokenprune:proxy-vit-larg"], "unknown model 'tokenprune:proxy-vit-larg': the "
                                               "shipped models are tokenprune:proxy-vit and "
                                               "tokenprune:proxy-vit-large"),
])
def test_visualize_refuses_what_a_shipped_model_does_not_take(tmp_path, capsys, no_command_run,
                                                              flags, message):
    status, out, err = run_main(["visualize", *flags, "--out", str(tmp_path / "k.png")], capsys)
    assert status == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tokenprune: error: {message}"), err


# ----- issue 28, a new user's findings: help and package text that is true today ------------

# The families' names, from the one table (tokenprune/vlm/families.py) that the help texts and
# setup.py's description read: a family added there is named everywhere.
FAMILY_NAMES = ", ".join(family.name for family in FAMILIES.values())


@pytest.mark.parametrize("argv, shown", [
    (["--help"], [FAMILY_NAMES, "OpenCLIP, timm, Hugging Face", "generate", "lmms-sweep"]),
    (["generate", "--help"], [FAMILY_NAMES, "with --ratio R ceil(R * n) of an image's n",
                              "--ratio RATIO", "in (0, 1]"]),
])
def test_help_names_every_model_family_and_ratio(tmp_path, argv, shown):
    proc = subprocess.run([sys.executable, "-c", FAST_CHECK, json.dumps(argv)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    *help_text, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == {"status": 0, "heavy": []}, proc.stderr
    text = " ".join(" ".join(help_text).split())  # argparse wraps lines
    for words in shown:
        assert words in text, words
    assert "a LLaVA model" not in text and "with a LLaVA model" not in text


def test_package_description_names_what_it_prunes():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "setup.py", "--description"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    description = proc.stdout.strip().splitlines()[-1]
    for words in ("OpenCLIP", "timm", "Hugging Face", FAMILY_NAMES):
        assert words in description, words
    assert "for OpenCLIP Vision Transformers" not in description
