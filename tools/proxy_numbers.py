"""Accuracy and object-patch recall of the shipped small ViT, unpruned and pruned, on its
held-out canvases: the seed's selection against the `random` and `cls` controls.

    python tools/proxy_numbers.py --n 2000 --budgets 2,6 4,12 8,24 --layers 3 1

One line per (layer, method, budget): accuracy, and the fraction of the digit's patches (those
overlapping its ink box) that the pruned block kept. A quick look for the tests and the report;
the benchmark proper is bench/fidelity.py's job.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tokenprune import PruneConfig, pruned_block, remove_pruning, replace_last_block  # noqa: E402
from tokenprune.proxy import heldout_set, load_proxy_model, object_patches, preprocess  # noqa: E402


@torch.no_grad()
def evaluate(model, pixels, labels, objects, config=None, batch=500):
    """(accuracy, object recall) of the model, pruned with `config` unless it is None."""
    remove_pruning(model)
    if config is not None:
        replace_last_block(model, config=config)
    correct, kept, total = 0, 0, 0
    for i in range(0, len(labels), batch):
        correct += (model(pixels[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum().item()
        obj = objects[i:i + batch]
        if config is None:
            kept += obj.sum().item()
        else:
            keep_idx = pruned_block(model).last_keep_idx
            kept += obj.gather(1, keep_idx - 1).sum().item()
        total += obj.sum().item()
    remove_pruning(model)
    return correct / len(labels), kept / total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--budgets", nargs="+", default=["2,6", "4,12", "8,24"], help="k,m pairs")
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 1])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, card = load_proxy_model()
    images, labels, boxes = heldout_set(args.n, card)
    pixels, objects = preprocess()(images), object_patches(boxes)
    acc, recall = evaluate(model, pixels, labels, objects)
    print(f"unpruned: accuracy {acc:.4f}, {objects.sum(1).float().mean():.2f} of 64 patches "
          f"overlap the digit on average, n={args.n}")
    for layer in args.layers:
        for budget in args.budgets:
            k, m = map(int, budget.split(","))
            for method, config in (
                    ("score", PruneConfig(k_anchors=k, top_m=m, alpha=args.alpha, layer=layer,
                                          backend="reference")),
                    ("cls", PruneConfig(k_anchors=k + m, top_m=0, layer=layer,
                                        backend="reference")),
                    ("random", PruneConfig(k_anchors=k, top_m=m, layer=layer, selection="random",
                                           seed=0, backend="reference"))):
                acc, recall = evaluate(model, pixels, labels, objects, config)
                print(f"layer {layer}  k={k:2d} m={m:2d} ({k + m:2d} of 64)  {method:6s}  "
                      f"accuracy {acc:.4f}  object recall {recall:.3f}", flush=True)


if __name__ == "__main__":
    main()
