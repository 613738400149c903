"""The shipped small ViTs and their held-out canvases (tokenprune/proxy.py) as a model and a
dataset that CLIP_benchmark's zero-shot classification runs: `tokenprune eval --model
tokenprune:proxy-vit-large --dataset tokenprune:digits-large` (the names: SHIPPED_MODELS and
SHIPPED_DATASETS in shipped_rules.py, which says what runs with what).

The shipped ViTs have a class head (10 logits) and no text tower. CLIP_benchmark scores an
image as 100 * normalize(encode_image(image)) @ classifier, the classifier's column c being the
normalised mean of encode_text over class c's prompts. Here encode_image is the head's logits
and encode_text of class c is the unit vector of class c, so the classifier is the identity and
each score is the logit divided by the logits' norm: a positive factor per image, which leaves
the ranking, and so top-1 and top-5, exactly the head's own. (The head's weight rows as class
embeddings would not: CLIP_benchmark divides each by its norm, which reorders close logits.)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..proxy import heldout_set, load_proxy_model, preprocess, proxy_card
from .shipped_rules import SHIPPED_DATASETS, SHIPPED_MODELS

CLASSES = [str(digit) for digit in range(10)]  # the head's outputs, in order
TEMPLATES = ["{c}"]  # one prompt per class: its name, which the tokenizer reads back


def tokenize(texts):
    """CLIP_benchmark's tokenizer for the shipped models: each prompt (a class name) to its
    class index."""
    return torch.tensor([CLASSES.index(text) for text in texts])


class ShippedClip(nn.Module):
    """A shipped ViT seen as a CLIP model: `visual` is the OpenCLIP VisionTransformer that
    tokenprune prunes; encode_image gives its 10 logits, encode_text the unit vector of each
    tokenized class."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, class_indices):
        return F.one_hot(class_indices, len(CLASSES)).float()


def load_shipped_model(model_name, device):
    """CLIP_benchmark's load_clip for a shipped model: (model, transform, tokenizer)."""
    model, _ = load_proxy_model(SHIPPED_MODELS[model_name])
    return ShippedClip(model).to(device).eval(), preprocess(), tokenize


class HeldoutCanvases(torch.utils.data.Dataset):
    """A regime's held-out canvases, the ones its card's accuracy was measured on, as
    CLIP_benchmark's datasets are: (transform(image), label) items, `classes` and
    `templates`."""

    def __init__(self, regime, transform, count=None):
        card = proxy_card(regime)
        images, self.labels, _ = heldout_set(count or card["heldout_n"], card)
        self.images = images[:, :1].clone()  # grey: one channel kept, three given out
        self.channels = images.shape[1]
        self.transform = transform
        self.classes = list(CLASSES)
        self.templates = list(TEMPLATES)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index].expand(self.channels, -1, -1)
        return self.transform(image), int(self.labels[index])


def build_shipped_dataset(dataset_name, transform, count=None):
    """CLIP_benchmark's build_dataset for a shipped dataset (count: the first `count` canvases
    instead of the card's all)."""
    return HeldoutCanvases(SHIPPED_DATASETS[dataset_name], transform, count)
