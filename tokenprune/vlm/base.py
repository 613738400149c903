"""What the pruning of every vision-language family shares: the state that `prune_image_tokens`
installs on one model (its hooks, the methods it wraps on the model object, the processors it
patched) and how it is undone. A family is a subclass in a module of its own (docs/design.md,
"A new vision-language family"); nothing here knows a family."""
import inspect
from contextvars import ContextVar
from typing import Optional

from ..towers import UnsupportedModelError, find_tower
from .units import kept_count

# Where the state of a pruned model or processor is kept (a plain attribute).
ATTRIBUTE = "_tokenprune_image_tokens"
# The state of the *Model call under way in this thread or task, for the families whose hooks
# hand each call's kept units from the *Model to its language model (Qwen-VL, Gemma 3): set and
# ended by that model's own hooks; its `owner` says whose (a deep copy has a state of its own).
CALL = ContextVar("tokenprune_call", default=None)
# The attribute of an image-features output that pairs each image's rows with what the family
# needs of it (Qwen-VL: its grid (t, h, w); InternVL: its unit count) and its kept units.
KEPT_UNITS = "tokenprune_kept_units"


class ImageTokenPruning:
    """The pruning of one vision-language model; `tokenprune.pruned_block(model)` returns it.

    A family's subclass sets the class attributes below and implements `install_hooks` (and,
    where its processor writes placeholders, `placeholder_count`); `prune` is its entry.
    `last_keep_idx`: the kept units of the last image batch (the family says in which form);
    None before the first image. `kept(n)`: the units an image of n units keeps.
    """
    model_type = None        # config.model_type of the family's models
    name = None              # what messages call the family
    model_classes = ()       # the transformers classes it takes: *ForConditionalGeneration first
    processor_classes = ()   # the processors it patches
    layer_inside_tower = False  # whether `layer=L` can cut inside the vision tower
    without_layer = "leave layer None"  # where this family prunes instead, for the refusal

    def __init__(self, model, inner, config, ratio):
        self.model = model
        self.inner = inner
        self.config = config
        self.ratio = ratio
        self.last_keep_idx = None
        self.processors = []
        self._handles = []
        self._wrapped = []

    @classmethod
    def inner_model(cls, model):
        """The model's inner *Model when `model` is one of model_classes, else None."""
        name = type(model).__name__
        if name not in cls.model_classes or not type(model).__module__.startswith("transformers."):
            return None
        import transformers
        if type(model) is not getattr(transformers, name, None):
            return None
        return model.model if name == cls.model_classes[0] else model

    @classmethod
    def prepare(cls, model, inner, processor, config, ratio, layer):
        """The state to attach for prune_image_tokens' checked arguments, or a string saying
        why nothing can be pruned; refuses what the family cannot take."""
        raise NotImplementedError

    def kept(self, n):
        return kept_count(n, self.config.kept_patches, self.ratio)

    @classmethod
    def vision_tower(cls, inner, takes):
        """The Tower of the model's `vision_tower`, or UnsupportedModelError saying what the
        family takes (`takes`: "a SigLIP one") and naming the supported families."""
        try:
            return find_tower(inner.vision_tower)
        except UnsupportedModelError:
            from .families import supported
            raise UnsupportedModelError(f"tokenprune.prune_image_tokens cannot prune a {cls.name} "
                                        f"model with a {type(inner.vision_tower).__name__} "
                                        f"vision tower (it takes {takes}); it supports "
                                        f"{supported()}") from None

    # --- what a family installs ------------------------------------------------------------

    def install_hooks(self):
        raise NotImplementedError

    def placeholder_count(self, processor):
        """The object whose replace_image_token and num_multimodal_tokens the patched processor
        uses; a family whose processor writes placeholders implements it."""
        raise NotImplementedError

    def restore(self):
        """Undo what install_hooks changed besides hooks and wrapped methods (a config value)."""

    def hook(self, module, function, *, post=False, **options):
        """Register a forward pre-hook (a forward hook with post=True) that remove() takes off.
        Bound methods as hooks, so that copy.deepcopy of the model gives the copy's hooks its
        own state."""
        register = module.register_forward_hook if post else module.register_forward_pre_hook
        self._handles.append(register(function, **options))

    def wrap_method(self, name):
        """The inner model's method `name` replaced on the instance by this state's method of
        the same name, called as method(original, ...)."""
        setattr(self.inner, name, Wrapped(getattr(self, name), getattr(self.inner, name)))
        self._wrapped.append(name)

    # --- one *Model call, for the families that place each call's kept units ----------------

    def encode_images(self, kwargs):
        """The image features of a *Model call given pixel_values (`kwargs` by name)."""
        raise NotImplementedError

    def images_of_call(self, args, kwargs):
        """For a forward pre-hook of the *Model: (its arguments by name, its image features), or
        None for a call without images. Given pixel_values, the tower runs here and its features
        go on as mm_encoder_outputs, so that forward and generate (which encodes the images
        before the prefill) take one path."""
        names = list(inspect.signature(type(self.inner).forward).parameters)[1:]  # after self
        kwargs = {**dict(zip(names, args)), **kwargs}
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        if kwargs.get("pixel_values") is None and encoded.get("image") is None:
            return None
        if kwargs.get("input_ids") is None:
            raise ValueError("prune_image_tokens needs input_ids with pixel_values (it finds the "
                             "image placeholders there), got inputs_embeds only")
        if kwargs.get("pixel_values") is not None:
            encoded["image"] = self.encode_images(kwargs)
            kwargs.update(pixel_values=None, mm_encoder_outputs=encoded)
        return kwargs, encoded["image"]

    def this_call(self):
        """The state of this model's *Model call under way (CALL), else None."""
        call = CALL.get()
        return call if getattr(call, "owner", None) is self else None

    def end_call(self, inner, args, kwargs, output):
        """Forward hook of the *Model (also when it raised): the call's state is done."""
        if self.this_call() is not None:
            CALL.set(None)

    # --- the processor ---------------------------------------------------------------------

    def check_processor(self, processor):
        """UnsupportedModelError unless `processor` is one of processor_classes."""
        name = type(processor).__name__
        if name not in self.processor_classes or not hasattr(processor, "image_processor"):
            raise UnsupportedModelError(f"prune_image_tokens can patch a "
                                        f"{' or '.join(self.processor_classes)} for "
                                        f"{type(self.model).__name__}, got {name}")

    def patch_processor(self, processor):
        remove_image_token_pruning(processor)
        count = self.placeholder_count(processor)
        setattr(processor, ATTRIBUTE, count)
        processor.replace_image_token = count.replace_image_token
        processor._get_num_multimodal_tokens = count.num_multimodal_tokens
        self.processors.append(processor)

    # --- install and undo ------------------------------------------------------------------

    def attach(self, processor):
        """Install on the model (the earlier pruning removed first) and patch the processor."""
        remove_image_token_pruning(self.model)
        self.install_hooks()
        setattr(self.model, ATTRIBUTE, self)
        if processor is not None:
            self.patch_processor(processor)
        return self

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name in self._wrapped:
            self.inner.__dict__.pop(name, None)
        self._wrapped = []
        self.restore()
        for processor in self.processors:
            if getattr(processor, ATTRIBUTE, None) is not None:
                remove_image_token_pruning(processor)
        self.processors = []


class Wrapped:
    """A model method replaced on the instance: `wrapper(original, ...)`. An object holding two
    bound methods rather than a closure, so that copy.deepcopy of the model gives the copy
    wrappers of its own state and its own original methods."""

    def __init__(self, wrapper, original):
        self.wrapper = wrapper
        self.original = original
        # transformers reads a method's signature (through __wrapped__) to route its inputs.
        self.__wrapped__ = original

    def __call__(self, *args, **kwargs):
        return self.wrapper(self.original, *args, **kwargs)


def check_placeholder_count(written, images, kept, unpruned, advice):
    """ValueError unless the prompts hold `kept` image tokens for each of `images` images (a
    count that every image shares); it says what they hold, whether that is the `unpruned`
    count (an unpatched processor's), and `advice`, what to do."""
    if written == images * kept:
        return
    unpatched = (" (the unpruned count: was the processor patched?)"
                 if written == images * unpruned else "")
    raise ValueError(f"the prompts hold {written} image tokens for {images} images, "
                     f"{written / images:g} per image{unpatched}, but the pruned model gives "
                     f"{kept} per image: {advice}")


def all_kept(config, ratio, count, what):
    """Why nothing is pruned when every one of `count` tokens is kept: "k_anchors + top_m = 64
    >= 16 patch tokens", "ratio=1.0 keeps all 16 patch tokens" (`what`: "patch tokens")."""
    how = (f"k_anchors + top_m = {config.kept_patches} >=" if ratio is None
           else f"ratio={ratio} keeps all")
    return f"{how} {count} {what}"


def image_token_pruning(obj) -> Optional[ImageTokenPruning]:
    """The ImageTokenPruning of a model patched by prune_image_tokens, else None."""
    state = getattr(obj, ATTRIBUTE, None)
    return state if isinstance(state, ImageTokenPruning) else None


def remove_image_token_pruning(obj) -> bool:
    """Undo prune_image_tokens on a model (and the processors patched with it) or on one
    processor; False when `obj` was not patched."""
    state = getattr(obj, ATTRIBUTE, None)
    if state is None:
        return False
    if isinstance(state, ImageTokenPruning):
        state.remove()
    else:  # a processor: back to its class's methods
        for name in ("replace_image_token", "_get_num_multimodal_tokens"):
            obj.__dict__.pop(name, None)
    delattr(obj, ATTRIBUTE)
    return True


def attach_per_image(output, attribute, *values):
    """Pair each image's rows of an image-features output (its pooler_output) with values of its
    own (each of `values` holds one entry per image), as the output's `attribute`: generate's
    expansion for beams and num_return_sequences repeats an image's rows object, not its index,
    so per_image finds them again by the rows themselves."""
    setattr(output, attribute, tuple(zip(output.pooler_output, *values)))


def per_image(features, attribute, what):
    """Per image of an image-features output, in the order of its rows, the tuple of values that
    attach_per_image paired with its rows; ValueError for features made elsewhere, or split
    since (`what` the values say, for the message: "units", "rows")."""
    pairs = getattr(features, attribute, None)
    if pairs is None:
        raise ValueError(f"the image features given (mm_encoder_outputs) did not come from the "
                         f"pruned model's own tower, so tokenprune cannot tell which {what} they "
                         f"keep: pass pixel_values instead")
    found = []
    for rows in features.pooler_output:
        values = next((pair[1:] for pair in pairs if pair[0] is rows), None)
        if values is None:
            raise ValueError(f"the image features given (mm_encoder_outputs) were split or "
                             f"rebuilt after the pruned tower made them (as a chunked prefill "
                             f"does), so tokenprune cannot tell which {what} they keep")
        found.append(values)
    return found


def kept_units(features):
    """(paired, keep): for each image of an image-features output that a pruned tower made
    (attach_per_image with KEPT_UNITS), in the order of its rows, what the family paired with
    them (Qwen-VL: its grid; InternVL: its unit count) and its kept units (1-D int64)."""
    found = per_image(features, KEPT_UNITS, "units")
    return [paired for paired, _ in found], [idx for _, idx in found]
