"""`tokenprune generate`: answer a prompt about images with a vision-language model of a family
in tokenprune/vlm/families.py (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen-VL, Qwen3.5, Gemma 3,
InternVL, ...) whose language model sees fewer image tokens per image
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
import re
import time
import warnings

from ..config import IMAGE_TOKEN_ARGUMENTS, IMAGE_TOKEN_TOP_M, image_token_config
from .checks import check_device
from .common import DEBUG_ENV, CLIError, note
from .loading import torchvision_mismatch_message

from ..vlm.families import FAMILIES, supported

# model_type -> the transformers class that generate loads it with (tokenprune/vlm/families.py).
MODEL_CLASSES = {model_type: family.model_class for model_type, family in FAMILIES.items()}
SUPPORTED_MODEL_TYPES = tuple(MODEL_CLASSES)


# ----- checks made before anything is imported or loaded ------------------------------------

def pruning_arguments(args):
    """prune_image_tokens' keywords from the flags (IMAGE_TOKEN_ARGUMENTS), but `layer`, which
    image_token_config does not take: run_generate passes it itself."""
    return {name: getattr(args, name) for name in IMAGE_TOKEN_ARGUMENTS if name != "layer"}


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
    them), --max_new_tokens, the image files, and --model: a local folder, or a hub id (offline,
    one in the Hugging Face cache), whose config.json says what --layer and --max_new_tokens
    may be. A CLIError names the flag."""
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
    config = model_config_before_loading(args.model)
    if config is not None:
        check_config(args, config)


# A hub repository id: a name, or owner/name, of letters, digits, '-', '_' and '.'.
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def _looks_like_path(name):
    """Not a hub id ("name" or "owner/name"): a path's spelling (/, ./, ../, ~, a separator
    at the end or twice), a first part that is a folder here (tools/tiny_qwn), or characters a
    hub id cannot have."""
    owner = name.split("/", 1)[0] if "/" in name else None
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or name.endswith(("/", os.sep)) or (os.sep != "/" and os.sep in name)
            or (owner is not None and os.path.isdir(owner)) or not HUB_ID.match(name))


def model_config_before_loading(model):
    """config.json of --model as a dict, read before anything is imported: from a saved folder,
    or, for a hub id, from the Hugging Face cache when the hub is switched off (HF_HUB_OFFLINE);
    None when the hub must be asked (then the first line says so). A folder that is not a saved
    LLaVA or Qwen-VL, a path that does not exist and a hub id missing offline are CLIErrors."""
    if not os.path.isdir(model):
        if _looks_like_path(model):
            raise CLIError(f"--model {model}: no such folder (give a folder saved with "
                           "save_pretrained, or a hub id such as llava-hf/llava-1.5-7b-hf)")
        import huggingface_hub.constants
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            note(f"--model {model} is not a folder here: asking the Hugging Face hub for it "
                 "(HF_HUB_OFFLINE=1 uses the local cache only, without waiting for the network)")
            return None
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(model, "config.json")
        if not isinstance(path, str):
            raise CLIError(f"--model {model}: not a folder here, and not in the Hugging Face "
                           "cache, which is all that is read with HF_HUB_OFFLINE=1; give a "
                           "folder saved with save_pretrained, or unset HF_HUB_OFFLINE where the "
                           "hub can be reached")
    else:
        path = os.path.join(model, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError:
        raise CLIError(f"--model {model}: no config.json in this folder; expected a model saved "
                       "with save_pretrained (config.json, the weights and the processor's "
                       "files)") from None
    except ValueError as err:
        raise CLIError(f"--model {model}: {path} is not a JSON object ({err})") from err
    if not isinstance(config, dict):
        raise CLIError(f"--model {model}: {path} is not a JSON object")
    check_model_type(model, config.get("model_type"))
    return config


def max_positions(config):
    """The language model's max_position_embeddings in a config dict (None if it has none)."""
    text = config.get("text_config") or {}
    limit = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def check_config(args, config):
    """What a model's config (a dict) allows, before its weights load: --layer (LLaVA has none;
    a Qwen-VL tower has vision_config.depth blocks, Qwen2.5-VL's --layer a full-attention one)
    and --max_new_tokens (the prompt and the answer share max_position_embeddings)."""
    if args.layer is not None:
        problem = layer_problem(args.model, config, args.layer)
        if problem:
            raise CLIError(problem)
    limit = max_positions(config)
    if limit is not None and args.max_new_tokens >= limit:
        raise CLIError(f"--max_new_tokens {args.max_new_tokens}: {args.model}'s language model "
                       f"has {limit} positions (max_position_embeddings), which the prompt and "
                       f"the answer share; give fewer than {limit} minus the prompt's tokens")


def layer_problem(model, config, layer, name="--layer"):
    """Why `layer` does not fit the model whose config (a dict) is given, naming it as `name`
    (generate's flag, or lmms-eval's argument): LLaVA takes no layer; a Qwen-VL tower has
    vision_config.depth blocks, and Qwen2.5-VL selects at a full-attention one only. None when
    it fits, or when the config does not say."""
    model_type = config.get("model_type")
    if model_type == "llava":
        return (f"{name} {layer}: {name} is for the Qwen-VL models; a LLaVA model is pruned at "
                "the vision block whose output it uses (its config's vision_feature_layer): "
                f"leave {name} out")
    vision = config.get("vision_config") or {}
    depth = vision.get("depth")
    if not isinstance(depth, int) or isinstance(depth, bool):
        return None
    if not -depth <= layer < depth:
        return (f"{name} must be a vision block index in [{-depth}, {depth - 1}] for {model}'s "
                f"{depth}-block vision tower, got {layer}")
    index = layer % depth
    full = vision.get("fullatt_block_indexes") if model_type == "qwen2_5_vl" else None
    if full and index not in full:
        return (f"{name} {layer} is window-attention block {index} of Qwen2.5-VL's vision "
                f"tower: {name} must be one of its full-attention blocks {list(full)} (or "
                f"{[i - depth for i in full]}), where the selection sees the whole image")
    return None


def check_prompt_fits(args, config, processor, texts, images, per_answer):
    """The longest prompt (as the pruned model reads it, and unpruned with --compare) plus
    --max_new_tokens fits the language model's max_position_embeddings: checked with the
    processor, before the weights load."""
    from ..vlm.units import kept_count
    limit = max_positions(config)
    if limit is None:
        return
    counted = processor(images=images_per_text(images, texts), text=texts, padding=True,
                        return_tensors="pt")
    lengths = counted["attention_mask"].sum(1).tolist()
    per_image = image_token_counts(config, processor, images)
    kept = image_token_config(**pruning_arguments(args)).kept_patches
    longest = 0
    for answer, length in enumerate(lengths):
        its_images = per_image[answer * per_answer:(answer + 1) * per_answer]
        pruned = length - sum(n - kept_count(n, kept, args.ratio) for n in its_images)
        longest = max(longest, length if args.compare else pruned)
    if longest + args.max_new_tokens > limit:
        which = "the unpruned prompt (--compare)" if args.compare else "the pruned prompt"
        raise CLIError(f"--max_new_tokens {args.max_new_tokens}: {which} takes {longest} of "
                       f"{args.model}'s {limit} positions (max_position_embeddings), so at most "
                       f"{max(limit - longest, 0)} new tokens fit")


def images_per_text(images, texts):
    """The images as a list per text, as every family's processor takes them (Gemma 3's takes
    a flat list as all for one text)."""
    per_text = len(images) // len(texts)
    return [images[i * per_text:(i + 1) * per_text] for i in range(len(texts))]


def image_token_counts(config, processor, images):
    """Image tokens of each image as the processor writes them, before pruning."""
    if config.get("model_type") == "llava":
        return [config["image_seq_length"]] * len(images)
    sizes = [(image.height, image.width) for image in images]
    return list(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens)


def check_model_type(model, model_type):
    if model_type not in SUPPORTED_MODEL_TYPES:
        examples = " or ".join(family.example for family in FAMILIES.values())
        raise CLIError(f"--model {model} is a {model_type!r} model, which tokenprune generate "
                       f"does not run; it runs {supported()} models (such as {examples})")


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


def load(model_name, device, dtype, before_weights=None):
    """(model, processor) of --model, on `device` in `dtype`, in eval mode.
    `before_weights(config, processor)` runs once both are loaded, before the weights: the
    checks that need them (config a dict)."""
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
    if before_weights is not None:
        before_weights(config.to_dict(), processor)
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

    inputs = processor(images=images_per_text(images, texts), text=texts, padding=True,
                       return_tensors="pt").to(device)
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
    """`tokenprune generate`, once check_generate_args has passed (the command line calls it
    first, before this imports torch)."""
    from .. import UnsupportedModelError, prune_image_tokens, pruned_block

    device = check_device(args.device)
    if args.dtype == "float16" and not str(device).startswith("cuda"):
        note("warning: float16 on the CPU is slow and some operations lack it; "
             "--dtype float32 is the CPU's default")
    dtype = resolve_dtype(args.dtype, device)
    images = read_images(args.image)

    def check_before_weights(config, processor):
        check_config(args, config)  # a hub model's config is read only now
        texts, per_answer = prompts(processor, args.prompt, len(images))
        check_prompt_fits(args, config, processor, texts, images, per_answer)
    model, processor = load(args.model, device, dtype, check_before_weights)
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
