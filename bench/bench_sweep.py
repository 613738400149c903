"""The sweep's engine against separate runs: one batch of random images encoded under a grid
of pruning settings plus the unpruned model.

Providers (one group per model and grid):
- grid: `GridEncoder`, what `tokenprune sweep` runs per batch: the unpruned tower once, then
  for each setting only its pruned block and the blocks after it (plus the patch embedding).
- separate: what the same settings cost as separate `tokenprune eval` runs, minus loading and
  data: for each setting (and the unpruned model), `replace_last_block` then `encode_image`.
images/s counts images per full grid (every setting), so the two rows compare directly.
"""
import pytest
import torch

from tokenprune import PruneConfig, remove_pruning, replace_last_block
from tokenprune.sweep import GridEncoder

MODEL = "ViT-B-16"
ALPHAS = (0.3, 0.7)
TOP_MS = (20, 50, 100)


def grids(smoke):
    """(label, layer, configs): the last block, and the middle block of ViT-B/16's 12."""
    top_ms, alphas = (TOP_MS[:1], ALPHAS[:1]) if smoke else (TOP_MS, ALPHAS)
    return [(label, layer, [PruneConfig(k_anchors=10, top_m=m, alpha=a, layer=layer)
                            for m in top_ms for a in alphas])
            for label, layer in (("last", -1), ("middle", 6))]


@pytest.mark.parametrize("provider", ["grid", "separate"])
@pytest.mark.parametrize("where", ["last", "middle"])
def test_sweep_grid(provider, where, env, clip_model, run_benchmark):
    batch = env.e2e_batch[MODEL]
    label, layer, configs = next(g for g in grids(env.smoke) if g[0] == where)
    model = clip_model(MODEL)
    remove_pruning(model)
    visual = model.visual
    torch.manual_seed(0)
    images = torch.randn(batch, 3, *visual.image_size, device=env.device, dtype=env.dtype)

    if provider == "grid":
        encoder = GridEncoder(visual, [None, *configs], forward=model.encode_image)

        def run():
            with torch.inference_mode():
                encoder(images)
            env.sync()
    else:
        def run():
            with torch.inference_mode():
                for config in [None, *configs]:
                    remove_pruning(model)
                    if config is not None:
                        replace_last_block(model, config=config)
                    model.encode_image(images)
            remove_pruning(model)
            env.sync()

    try:
        run_benchmark(run, f"sweep {MODEL} B={batch} {label} block, {len(configs)} settings + "
                      "unpruned", batch, kind="sweep", provider=provider, model=MODEL,
                      layer=layer % len(visual.transformer.resblocks), settings=len(configs) + 1,
                      backend=env.resolve("auto"))
    finally:
        remove_pruning(model)
