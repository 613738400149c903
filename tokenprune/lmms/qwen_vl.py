"""tokenprune_qwen2_vl, tokenprune_qwen2_5_vl and tokenprune_qwen3_vl: lmms-eval's own
`qwen2_vl`, `qwen2_5_vl` and `qwen3_vl` models (the implementations that `--model qwen2_vl`,
`qwen2_5_vl` and `qwen3_vl` run: chat, except for qwen2_vl), pruned by
tokenprune.prune_image_tokens. Their bases already run real batches (left-padded), so only the
pruning and the measurements are added.

Imported by lmms-eval only, when a run asks for one of these models.
"""
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

from .measure import BatchingBasePlugin


class TokenpruneQwen2_VL(BatchingBasePlugin, Qwen2_VL):
    MODEL_ID = "tokenprune_qwen2_vl"


class TokenpruneQwen2_5_VL(BatchingBasePlugin, Qwen2_5_VL):
    MODEL_ID = "tokenprune_qwen2_5_vl"


class TokenpruneQwen3_VL(BatchingBasePlugin, Qwen3_VL):
    MODEL_ID = "tokenprune_qwen3_vl"
