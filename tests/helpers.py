"""Offline test data, shared by the tests: a tiny OpenCLIP architecture, a few steps of
training so that zero-shot accuracy is not constant, and a WebDataset of coloured squares.

Also a script, for trying the command line without downloads (see docs/commands.md, "Worked example, offline"):

    python tests/helpers.py wds DIR [--images 200] [--size 224]   # a WebDataset in DIR
    python tests/helpers.py checkpoint ViT-B-16 FILE.pt           # random weights, saved
"""
import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

TINY = "tokenprune-test-tiny"
# 32 px images, 4 px patches: 8 x 8 = 64 patches, 65 tokens; two blocks of width 64, 2 heads.
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                           "patch_size": 4},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 1}}
# Another architecture, for a checkpoint that does not fit TINY: 8 px patches, one block.
OTHER = "tokenprune-test-other"
OTHER_CFG = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "patch_size": 8, "layers": 1}}
CLASSES = ["red", "green", "blue", "yellow", "purple"]  # >= 5 classes, so acc5 is computed
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40), (150, 50, 180)]
TEMPLATES = ["a photo of a {c}.", "a {c} thing."]


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of an in-process `tokenprune ...` (argparse errors exit)."""
    from tokenprune.cli import main
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def class_images(count, seed=0, size=32, classes=len(CLASSES)):
    """(images, labels): a square of the class colour, of random size and place, on noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        label = i % classes
        pixels = rng.integers(0, 256, (size, size, 3)).astype(float)
        side = rng.integers(size // 4, size * 5 // 8)
        top, left = rng.integers(0, size - side, 2)
        pixels[top:top + side, left:left + side] = (np.array(COLOURS[label])
                                                    + rng.normal(0, 20, (side, side, 3)))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
        labels.append(label)
    return images, labels


def write_webdataset(folder, images, labels, classes=CLASSES, templates=TEMPLATES):
    """CLIP_benchmark's WebDataset layout (one shard): `--dataset wds/NAME --dataset_root folder`."""
    folder = Path(folder)
    (folder / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "test" / "0.tar", "w") as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            png = io.BytesIO()
            image.save(png, "png")
            for ext, payload in (("png", png.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (folder / "test" / "nshards.txt").write_text("1")
    (folder / "classnames.txt").write_text("\n".join(classes))
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates))
    return str(folder)


def train_briefly(model, preprocess, images, labels, steps=12):
    """A few steps of zero-shot cross-entropy on a third of the images: random weights give
    one class for every image, which would make the metric comparisons blind."""
    tokens = open_clip.get_tokenizer(TINY)([f"a photo of a {c}." for c in CLASSES])
    pixels = torch.stack([preprocess(image) for image in images])
    target = torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        image_features = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        loss = torch.nn.functional.cross_entropy(10 * image_features @ text_features.T, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def make_tiny(root, images=30):
    """Under `root`: the tiny architecture (and OTHER) registered with OpenCLIP, a briefly
    trained checkpoint of it, an `images`-image WebDataset, and for the error paths a 9-image
    4-class WebDataset (acc5 is NaN), a checkpoint of OTHER and a truncated checkpoint:
    {"root", "checkpoint", "data", "data4", "other", "corrupt"}."""
    root = Path(root)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    (root / "configs" / f"{OTHER}.json").write_text(json.dumps(OTHER_CFG))
    open_clip.add_model_config(root / "configs")
    pictures, labels = class_images(images)

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    train_briefly(model, preprocess, pictures[:10], labels[:10])
    checkpoint = root / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    other = root / "other.pt"
    torch.save(open_clip.create_model(OTHER).state_dict(), other)
    corrupt = root / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])  # a download cut short
    data = write_webdataset(root / "wds", pictures, labels)
    # Four classes: CLIP_benchmark's acc5 is NaN (top-5 of 4); 9 images, batches of 4.
    data4 = write_webdataset(root / "wds4", *class_images(9, seed=2, classes=4), CLASSES[:4])
    return {"root": root, "checkpoint": str(checkpoint), "data": data, "data4": data4,
            "other": str(other), "corrupt": str(corrupt)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Offline data for trying tokenprune")
    commands = parser.add_subparsers(dest="command", required=True)
    wds = commands.add_parser("wds", help="a WebDataset of coloured squares on noise")
    wds.add_argument("folder")
    wds.add_argument("--images", type=int, default=200)
    wds.add_argument("--size", type=int, default=224, help="image side in pixels")
    wds.add_argument("--seed", type=int, default=0)
    checkpoint = commands.add_parser("checkpoint", help="an OpenCLIP model with random weights")
    checkpoint.add_argument("model")
    checkpoint.add_argument("file")
    checkpoint.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "wds":
        print(write_webdataset(args.folder, *class_images(args.images, args.seed, args.size)))
    else:
        torch.manual_seed(args.seed)
        torch.save(open_clip.create_model(args.model, pretrained=None).state_dict(), args.file)
        print(args.file)


if __name__ == "__main__":
    main()


def processor_inputs(processor, images, texts, side="left"):
    """A vision-language processor's padded batch, padded on `side` (its tokenizer is put back
    to left padding after)."""
    processor.tokenizer.padding_side = side
    try:
        return processor(images=images, text=texts, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "left"
