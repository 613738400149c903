"""`tokenprune generate`: answer a prompt about images with a LLaVA or Qwen-VL (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE; tokenprune/vlm/families.py has the
list) model whose language model sees k + m image tokens per image
(tokenprune.prune_image_tokens), and say what that saved.

    tokenprune generate --model llava-hf/llava-1.5-7b-hf --image cat.png --prompt "What is this?"
    tokenprune generate --model ./saved_llava --image a.png --image b.png --prompt "..." --compare

Every --image is answered on its own with the same --prompt, all in one batch. A prompt that
already holds the processor's image token (`<image>`) is used as written, with that many images
per answer; otherwise the processor's chat template puts one image entry before the text, or,
without a template, one `<image>` is put in front of the prompt. --compare first runs the
unpruned model on the same inputs. Times are the second of two runs (the first warms up).

This module imports torch and transformers only inside its functions, so that the light parser
can import `check_generate_args` and answer bad values at once.
"""
import json
import os
import time
import warnings

from ..config import IMAGE_TOKEN_TOP_M, image_token_config
from .common import CLIError, DEBUG_ENV, check_device, note, torchvision_mismatch_message

from ..vlm.families import FAMILIES, supported

# model_type -> the transformers class that generate loads it with (tokenprune/vlm/families.py).
MODEL_CLASSES = {model_type: family.model_class for model_type, family in FAMILIES.items()}
SUPPORTED_MODEL_TYPES = tuple(MODEL_CLASSES)


# ----- checks made before anything is imported or loaded ------------------------------------

def pruning_arguments(args):
    """prune_image_tokens' keywords from the flags."""
    return dict(k_anchors=args.k_anchors, top_m=args.top_m, alpha=args.alpha,
                score_norm=args.score_norm, backend=args.backend, selection=args.selection,
                mmr_lambda=args.mmr_lambda, ratio=args.ratio)


def pruning_settings(args):
    """The pruning the flags ask for, in words: 'k_anchors 10, top_m 54, mmr, lambda 0.8'."""
    count = f"ratio {args.ratio}" if args.ratio is not None else (
        f"k_anchors {args.k_anchors}, top_m "
        f"{IMAGE_TOKEN_TOP_M if args.top_m is None else args.top_m}")
    rule = {"score": f", alpha {args.alpha}", "mmr": f", lambda {args.mmr_lambda}"}
    where = "" if args.layer is None else f", vision block {args.layer}"
    return f"{count}, {args.selection}{rule.get(args.selection, '')}{where}"


def check_generate_args(args):
    """Everything that can be checked without torch: the pruning values (as PruneConfig checks
    them), --max_new_tokens, the image files and a local --model folder. A CLIError names the
    flag."""
    try:
        image_token_config(**pruning_arguments(args))
    except ValueError as err:
        raise CLIError(f"--{err}") from None
    if args.max_new_tokens < 1:
        raise CLIError(f"--max_new_tokens must be an integer >= 1, got {args.max_new_tokens}")
    for image in args.image:
        if os.path.isdir(image):
            raise CLIError(f"--image {image}: a folder, not an image file; give each image "
                           "with its own --image")
        if not os.path.isfile(image):
            raise CLIError(f"--image {image}: no such file")
    if not args.prompt.strip():
        raise CLIError("--prompt is empty: give the question to ask about the images")
    local_model_type(args.model)


def _looks_like_path(name):
    """Not a hub id ("name" or "owner/name")."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def local_model_type(model):
    """The model_type of a saved --model folder (None for a hub id); a folder that is not a
    saved LLaVA is a CLIError."""
    if not os.path.isdir(model):
        if _looks_like_path(model):
            raise CLIError(f"--model {model}: no such folder (give a folder saved with "
                           "save_pretrained, or a hub id such as llava-hf/llava-1.5-7b-hf)")
        return None
    path = os.path.join(model, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except OSError:
        raise CLIError(f"--model {model}: no config.json in this folder; expected a model saved "
                       "with save_pretrained (config.json, the weights and the processor's "
                       "files)") from None
    except (ValueError, AttributeError) as err:
        raise CLIError(f"--model {model}: {path} is not a JSON object ({err})") from err
    check_model_type(model, model_type)
    return model_type


def check_model_type(model, model_type):
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CLIError(f"--model {model} is a {model_type!r} model, not LLaVA or Qwen-VL; "
                       f"tokenprune generate runs {supported()} models (their model_type in "
                       "brackets), such as llava-hf/llava-1.5-7b-hf or "
                       "Qwen/Qwen2.5-VL-7B-Instruct")


# ----- loading -------------------------------------------------------------------------------

def _loading(model, what, load):
    """load(), with a failure turned into one line that says what could not be loaded."""
    try:
        return load()
    except CLIError:
        raise
    except Exception as err:  # noqa: BLE001 - translated, not swallowed
        mismatch = torchvision_mismatch_message(err)
        if mismatch:
            raise CLIError(mismatch) from err
        first = (str(err).strip().splitlines() or [""])[0]
        where = ("from the folder" if os.path.isdir(model) else
                 "from the hub (offline, or not a hub id? a folder saved with save_pretrained "
                 "also works)")
        raise CLIError(f"--model {model}: could not load its {what} {where}: "
                       f"{type(err).__name__}: {first} ({DEBUG_ENV}=1 shows the traceback)"
                       ) from err


def load(model_name, device, dtype):
    """(model, processor) of --model, on `device` in `dtype`, in eval mode."""
    import transformers
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # a bar per load says nothing our note does not
    config = _loading(model_name, "config", lambda: AutoConfig.from_pretrained(model_name))
    check_model_type(model_name, getattr(config, "model_type", None))
    processor = _loading(model_name, "processor",
                         lambda: AutoProcessor.from_pretrained(model_name))
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise CLIError(f"--model {model_name}: its processor is a {type(processor).__name__}, "
                       "not an image-and-text processor; save the model's processor with "
                       "save_pretrained into the same folder")
    model_class = getattr(transformers, MODEL_CLASSES[config.model_type])
    model = _loading(model_name, "weights", lambda: model_class.from_pretrained(
        model_name, dtype=dtype))
    return model.to(device).eval(), processor


def resolve_dtype(name, device):
    import torch
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def read_images(paths):
    from PIL import Image, UnidentifiedImageError
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise CLIError(f"--image {path}: not an image file that PIL can read "
                           f"({type(err).__name__})") from err
    return images


# ----- prompts -------------------------------------------------------------------------------

def prompts(processor, prompt, count):
    """(texts, images per text) for `count` images asked the same `prompt`."""
    image_token = getattr(processor, "image_token", "<image>")
    written = prompt.count(image_token)
    if written:
        if count % written:
            raise CLIError(f"--prompt holds {written} {image_token} tokens, so the images go "
                           f"{written} to an answer, but {count} --image were given")
        return [prompt] * (count // written), written
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = f"{image_token}\n{prompt}"
    return [text] * count, 1


def image_tokens(model, processor, images):
    """Image tokens per image as the processor writes them now: LLaVA's one count, or for
    Qwen-VL (a count per image size) the counts of these images, as "n" or "least-most"."""
    if model.config.model_type == "llava":
        return model.config.image_seq_length
    sizes = [(image.height, image.width) for image in images]
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    least, most = min(counts), max(counts)
    return str(least) if least == most else f"{least}-{most}"


# ----- one run -------------------------------------------------------------------------------

class _FirstToken:
    """A logits processor that notes when generate has the first token's logits: the prefill
    (tower, projector and the language model over the whole prompt) is done by then."""

    def __init__(self, sync):
        self.sync = sync
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.sync()
            self.at = time.perf_counter()
        return scores


def run_once(model, processor, texts, images, max_new_tokens, device):
    """(answers, time to first token, seconds for the rest, new tokens) of one greedy
    generate over the batch."""
    import torch
    from transformers import LogitsProcessorList

    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sync = ((lambda: torch.cuda.synchronize(device)) if str(device).startswith("cuda")
            else (lambda: None))
    first = _FirstToken(sync)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([first]))
        sync()
        end = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1]:]
    answers = [answer.strip() for answer in
               processor.batch_decode(new, skip_special_tokens=True)]
    return answers, first.at - start, end - first.at, new.shape[1]


def measured(model, processor, texts, images, max_new_tokens, device):
    """run_once after a one-token warm-up run (first calls compile and allocate)."""
    run_once(model, processor, texts, images, 1, device)
    return run_once(model, processor, texts, images, max_new_tokens, device)


def report(label, tokens, answers, first, rest, new, names, per_answer, baseline=None):
    batch = len(answers)
    speed = f", {batch * (new - 1) / rest:.1f} tokens/s after it" if new > 1 and rest > 0 else ""
    faster = f" (speed-up over unpruned: {baseline / first:.2f}x)" if baseline else ""
    print(f"{label}: {tokens} image tokens per image; batch {batch}, time to first token "
          f"{first * 1000:.1f} ms{faster}{speed}")
    for i, answer in enumerate(answers):
        which = ", ".join(names[i * per_answer:(i + 1) * per_answer])
        print(f"  [{which}] {answer}")


def run_generate(args):
    from .. import UnsupportedModelError, prune_image_tokens, pruned_block

    check_generate_args(args)
    device = check_device(args.device)
    if args.dtype == "float16" and not str(device).startswith("cuda"):
        note("warning: float16 on the CPU is slow and some operations lack it; "
             "--dtype float32 is the CPU's default")
    dtype = resolve_dtype(args.dtype, device)
    images = read_images(args.image)
    model, processor = load(args.model, device, dtype)
    texts, per_answer = prompts(processor, args.prompt, len(images))
    names = [os.path.basename(path) for path in args.image]
    before = image_tokens(model, processor, images)
    family = (f"LLaVA with a {model.config.vision_config.model_type} tower"
              if model.config.model_type == "llava" else model.config.model_type)
    note(f"{args.model}: {family}, {before} "
         f"image tokens per image, on {device} in {str(dtype).replace('torch.', '')}")

    unpruned_first = None
    if args.compare:
        answers, first, rest, new = measured(model, processor, texts, images,
                                             args.max_new_tokens, device)
        report("unpruned", before, answers, first, rest, new, names, per_answer)
        unpruned_first = first
    # The library's warnings (nothing to prune, ...) become one line each, like ours.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            prune_image_tokens(model, processor, layer=args.layer, **pruning_arguments(args))
        except UnsupportedModelError as err:
            raise CLIError(f"--model {args.model}: {err}") from err
        except ValueError as err:  # --layer, which needs the model's tower to check
            raise CLIError(f"--{err}") from err
    for warning in caught:
        note(f"warning: {(str(warning.message).strip().splitlines() or [''])[0]}")
    if pruned_block(model) is None:
        # k + m covers every patch: the model is unchanged, and a second run of it would only
        # time the same model twice.
        count = (f"ratio {args.ratio}" if args.ratio is not None else
                 f"k_anchors + top_m = {args.k_anchors + (args.top_m or IMAGE_TOKEN_TOP_M)}")
        nothing = f"nothing was pruned ({count} keeps every image token)"
        if args.compare:
            print(f"{nothing}: the answers above are the model's, with nothing to compare them to")
            return
        print(f"{nothing}: the answers below are the unpruned model's")
        report("unpruned", before, *measured(model, processor, texts, images,
                                             args.max_new_tokens, device), names, per_answer)
        return
    after = image_tokens(model, processor, images)
    answers, first, rest, new = measured(model, processor, texts, images, args.max_new_tokens,
                                         device)
    label = f"pruned ({pruning_settings(args)})"
    report(label, f"{before} -> {after}", answers, first, rest, new, names, per_answer,
           baseline=unpruned_first)
