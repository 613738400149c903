"""tokenprune_gemma3: lmms-eval's own `gemma3` model (its simple implementation, the only one
lmms-eval 0.7.3 has, which `--model gemma3` runs), pruned by tokenprune.prune_image_tokens. The
base already runs real batches (left-padded, to a multiple of 8), so only the pruning and the
measurements are added.

Imported by lmms-eval only, when a run asks for this model.
"""
from lmms_eval.models.simple.gemma3 import Gemma3

from .measure import BatchingBasePlugin


class TokenpruneGemma3(BatchingBasePlugin, Gemma3):
    MODEL_ID = "tokenprune_gemma3"
