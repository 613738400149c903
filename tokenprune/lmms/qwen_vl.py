"""tokenprune_qwen2_vl, tokenprune_qwen2_5_vl, tokenprune_qwen3_vl and tokenprune_qwen3_5:
lmms-eval's own `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl` and `qwen3_5` models (the implementations
that `--model qwen2_vl`, `qwen2_5_vl`, `qwen3_vl` and `qwen3_5` run: chat, except for qwen2_vl),
pruned by tokenprune.prune_image_tokens. Their bases already run real batches (left-padded), so
only the pruning and the measurements are added. lmms-eval's qwen3_vl also loads Qwen3-VL-MoE,
and its qwen3_5 Qwen3.5-MoE, when the pretrained name holds an active size such as "A3B".

Imported by lmms-eval only, when a run asks for one of these models.
"""
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.chat.qwen3_5 import Qwen3_5
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

from .measure import BatchingBasePlugin


class TokenpruneQwen2_VL(BatchingBasePlugin, Qwen2_VL):
    MODEL_ID = "tokenprune_qwen2_vl"


class TokenpruneQwen2_5_VL(BatchingBasePlugin, Qwen2_5_VL):
    MODEL_ID = "tokenprune_qwen2_5_vl"


class TokenpruneQwen3_VL(BatchingBasePlugin, Qwen3_VL):
    MODEL_ID = "tokenprune_qwen3_vl"


class TokenpruneQwen3_5(BatchingBasePlugin, Qwen3_5):
    MODEL_ID = "tokenprune_qwen3_5"
