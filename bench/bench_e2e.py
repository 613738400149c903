"""End to end: `model.encode_image` on random images, OpenCLIP models with random weights.

Providers (one group per model): the unpatched model; the model pruned at the last block;
the model pruned at a middle block (layer 6 of ViT-B/16's, SigLIP2's and EVA02's 12, layer 12
of ViT-L/14's 24),
each over a sweep of top_m with k_anchors=10. "pruned" uses backend="auto" (the Triton kernels
on CUDA, the reference on the CPU); on CUDA "pruned-reference" (m=50) shows what the kernels
contribute. images/s = batch / median time of one encode_image call, selection included.
"""
import pytest
import torch

from tokenprune import pruned_block, remove_pruning, replace_last_block
from tokenprune.towers import find_tower


def test_encode_image(e2e_case, env, clip_model, run_benchmark):
    case = e2e_case
    model = clip_model(case.model)
    visual = model.visual
    tower = find_tower(model)
    depth = len(tower.blocks)
    tokens = tower.num_prefix + tower.num_patches
    torch.manual_seed(0)
    images = torch.randn(case.batch, 3, *visual.image_size, device=env.device, dtype=env.dtype)

    info = dict(kind="e2e", provider=case.provider, model=case.model, tokens=tokens,
                depth=depth, layer_choice=case.layer_choice, k=None, m=None,
                layer=None, kept_tokens=tokens, backend=None)
    remove_pruning(model)
    if case.provider != "unpatched":
        backend = "reference" if case.provider == "pruned-reference" else "auto"
        if backend == "reference" and env.resolve("auto") == "reference":
            pytest.skip("backend='auto' is the reference on this device: the 'pruned' cases "
                        "already measure it")
        if env.resolve(backend) == "triton" and env.triton_skip_reason:
            pytest.skip(env.triton_skip_reason)
        replace_last_block(model, k_anchors=env.k_anchors, top_m=case.top_m, layer=case.layer,
                           backend=backend)
        info.update(k=env.k_anchors, m=case.top_m, layer=case.layer % depth,
                    kept_tokens=tower.num_prefix + env.k_anchors + case.top_m,
                    backend=env.resolve(backend))

    def forward():
        with torch.inference_mode():
            model.encode_image(images)
        env.sync()

    try:
        run_benchmark(forward, f"e2e {case.model} B={case.batch}", case.batch, **info)
        if case.provider != "unpatched":  # the benchmark timed a model that really pruned
            assert pruned_block(model).last_keep_idx.shape == (case.batch, env.k_anchors + case.top_m)
    finally:
        remove_pruning(model)
