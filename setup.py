import importlib.util
import re
import sys

from setuptools import setup

# One source for the version: tokenprune/__init__.py (tokenprune.__version__, tokenprune --version).
with open("tokenprune/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def vlm_families():
    """The vision-language families' names ("LLaVA-1.5, Qwen2-VL, ..."), from the table that
    every list of them reads (tokenprune/vlm/families.py, FAMILIES), loaded as a file of its
    own: it imports only the standard library, and the package need not be importable here."""
    spec = importlib.util.spec_from_file_location("tokenprune_vlm_families",
                                                  "tokenprune/vlm/families.py")
    families = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = families  # dataclasses looks its module up while it builds
    spec.loader.exec_module(families)
    return ", ".join(family.name for family in families.FAMILIES.values())


setup(
    name="tokenprune",
    version=VERSION,
    description="Training-free visual token pruning for Vision Transformers (OpenCLIP, timm "
                "and Hugging Face) and the image tokens of vision-language models "
                f"({vlm_families()}), with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    classifiers=["License :: OSI Approved :: MIT License"],
    python_requires=">=3.9",
    # The kernels live in the top-level kernels/ folder, which has no __init__.py, so that Hugging
    # Face's `kernels` package (which transformers imports) always wins over it, even from the repo
    # root. tokenprune/kernels is a link to that folder: the kernels install, and import in an
    # editable install, as the namespace subpackage tokenprune.kernels (docs/design.md).
    packages=["tokenprune", "tokenprune.towers", "tokenprune.vlm", "tokenprune.cli",
              "tokenprune.cli.commands", "tokenprune.kernels", "tokenprune.lmms"],
    install_requires=[
        "torch>=2.1",  # scaled_dot_product_attention with dropout_p and the stable sort we rely on
        # ResidualAttentionBlock with batch_first and VisionTransformer.transformer.resblocks;
        # 4.x may move them, so stay below it until checked.
        "open_clip_torch>=2.23,<4",
        "triton; platform_system == 'Linux'",
        # The command line (tokenprune/cli/): `tokenprune eval` is CLIP_benchmark's own parser,
        # datasets and metrics with the pruning hooked in (tested with 1.6.2).
        "clip-benchmark>=1.6,<2",
        # clip-benchmark 1.6.2 imports requests (its datasets/*.py) without declaring it.
        "requests",
        # tokenprune visualize draws its figure with PIL.
        "pillow",
        # The shipped small ViT's canvases are made from scikit-learn's bundled digits
        # (tokenprune/proxy.py): the first-run demo, its tests and its training script.
        "scikit-learn",
        # tokenprune sweep's accuracy_vs_tokens.png (axes, legend, markers); imported only there.
        "matplotlib",
    ],
    # The first-run demo's small trained ViT (tokenprune/proxy.py): its float16 weights and
    # their card; the sample picture of `tokenprune visualize --model ViT-B-16`.
    package_data={"tokenprune": ["assets/*.png", "assets/*.pt", "assets/*.json"]},
    entry_points={"console_scripts": ["tokenprune=tokenprune.cli:main"],
                  # lmms-eval (>= 0.6) loads plugin models from this group (tokenprune/lmms/).
                  "lmms_eval.models": ["tokenprune=tokenprune.lmms:manifests"]},
    extras_require={
        # tokenprune.prune_image_tokens and the Hugging Face CLIP / SigLIP towers (tested with
        # transformers 5.24.0 and 5.25.0); imported only where those models are handled.
        "vlm": ["transformers>=5,<6"],
        "dev": ["pytest", "pytest-benchmark", "transformers>=5,<6"],
        # tokenprune's models in lmms-eval (tokenprune/lmms/, docs/lmms-eval.md; tested with
        # lmms-eval 0.7.3). What a fresh install of 0.7.3 lacks: its llava_hf imports decord at
        # import time without declaring it, and its simple_evaluate imports filelock._api, which
        # filelock 4.3 removed.
        "lmms": ["lmms-eval>=0.6,<0.8", "transformers>=5,<6", "decord", "filelock<4.3"],
    },
)
