"""Train a small ViT that ships in tokenprune/assets/, one per regime of tokenprune.proxy.

    python tools/train_proxy.py                    # "small": the first-run demo's model
    python tools/train_proxy.py --regime large --steps 1600   # "large": digits over ~29% of
                                                   # the patches (see each card for its time)

Trains an OpenCLIP VisionTransformer (tokenprune.proxy.ARCH) to classify the digit on
tokenprune.proxy's canvases of the regime (fresh canvases every step, drawn from the training
digits), then measures held-out accuracy on canvases of digits it never saw, and writes the
checkpoint (float16) and its card (JSON) to tokenprune/assets/ under the regime's names.
Deterministic from --seed on a given machine and thread count: the data are a function of
(seed, step), the weights of torch's seed.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from tokenprune.proxy import (ARCH, PIXEL_MEAN, PIXEL_STD, REGIMES,
                              build_proxy_model, make_canvas_digits, object_patches, preprocess)

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tokenprune", "assets")


@torch.no_grad()
def accuracy(model, images, labels, batch=250):
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(labels), batch))
    return correct / len(labels)


def learning_rate(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="small",
                        help="which data recipe and asset names (default small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    # One thread: on the shared 2-core VM, two ran 25 steps in 114 s against 14 s for one.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1); results are reproducible per count")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out canvases to score")
    parser.add_argument("--heldout_seed", type=int, default=12345)
    parser.add_argument("--log_every", type=int, default=25)
    parser.add_argument("--out", default=ASSETS, help="folder for the checkpoint and its card")
    args = parser.parse_args(argv)
    regime = REGIMES[args.regime]

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    model = build_proxy_model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.99))
    normalize = preprocess()
    heldout = make_canvas_digits(args.heldout, args.heldout_seed, split="test", **regime.recipe)

    start = time.time()
    for step in range(args.steps):
        model.train()
        images, labels, _ = make_canvas_digits(args.batch, [args.seed, step], split="train",
                                               **regime.recipe)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = F.cross_entropy(model(normalize(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  "
                  f"{time.time() - start:.0f} s", flush=True)
    train_seconds = time.time() - start

    acc_float32 = accuracy(model, normalize(heldout[0]), heldout[1])
    # Stored in float16 (half the size); the card's accuracy is that of the stored weights.
    state = {name: value.half() for name, value in model.state_dict().items()}
    model.load_state_dict({name: value.float() for name, value in state.items()})
    acc = accuracy(model, normalize(heldout[0]), heldout[1])
    print(f"held-out accuracy {acc:.4f} on {args.heldout} canvases with the float16 weights "
          f"({acc_float32:.4f} before rounding them), training {train_seconds:.0f} s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    torch.save(state, os.path.join(args.out, regime.checkpoint))
    script = os.path.relpath(os.path.abspath(__file__), os.getcwd())
    card = {
        "model": "open_clip.transformer.VisionTransformer(**arch); visual(images) gives the 10 "
                 "class logits of tokenprune.proxy.preprocess()(canvases), the canvases float32 "
                 "(B, 3, 128, 128) in [0, 1] from tokenprune.proxy.make_canvas_digits",
        "pixel_mean": PIXEL_MEAN,
        "pixel_std": PIXEL_STD,
        "arch": ARCH,
        "recipe": regime.recipe,
        "seed": args.seed,
        "training": {"steps": args.steps, "batch": args.batch,
                     "optimizer": "AdamW, betas (0.9, 0.99)", "lr": args.lr, "warmup": args.warmup, "schedule": "linear warm-up, cosine",
                     "weight_decay": args.weight_decay, "grad_clip": 1.0,
                     "data": "make_canvas_digits(batch, [seed, step], split='train', "
                             "**recipe) each step",
                     "threads": args.threads},
        "command": " ".join(["python", script] + [shlex.quote(a) for a in (argv or sys.argv[1:])]),
        "heldout_seed": args.heldout_seed,
        "heldout_n": args.heldout,
        "heldout_accuracy": round(acc, 4),
        "heldout_accuracy_before_float16": round(acc_float32, 4),
        "train_seconds": round(train_seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "storage": "float16 state dict; load_proxy_model() casts it back to float32",
    }
    if args.regime != "small":  # the small card's keys stay those it shipped with
        objects = object_patches(heldout[2])  # (canvases, patches), over the held-out set
        per_canvas = objects.sum(1).float()
        card = {"regime": args.regime, **card,
                "object_patches_mean": round(per_canvas.mean().item(), 2),
                "object_patches_fraction": round(per_canvas.mean().item() / objects.shape[1], 4),
                "object_patches_range": [int(per_canvas.min()), int(per_canvas.max())]}
    with open(os.path.join(args.out, regime.card), "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.join(args.out, regime.checkpoint)} and {regime.card}")


if __name__ == "__main__":
    main()
