"""MiniCPM / MiniCPM4 (dense, or InfLLM v2 block-sparse attention when config.json has `sparse_config`).

MiniCPM's μP scales map onto llama.py's multipliers:
    embedding_multiplier = scale_emb
    residual_multiplier  = scale_depth / sqrt(num_hidden_layers)
    logits: lm_head(h / (hidden_size / dim_model_base))  ==  lm_head(h) / (hidden_size / dim_model_base)
"""

import dataclasses
import math

from edgelm.layers.sparse_attention import SparseConfig
from edgelm.models import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: int | None = None
    sparse_config: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        self.embedding_multiplier = self.scale_emb
        self.residual_multiplier = self.scale_depth / math.sqrt(self.num_hidden_layers)
        if self.dim_model_base:
            self.logits_scaling = self.hidden_size / self.dim_model_base


class Model(llama.Model):
    """With a `sparse_config` (MiniCPM4), every attention layer runs InfLLM v2 sparse attention."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        if args.sparse_config:
            self.set_sparse_attention(SparseConfig.from_dict(args.sparse_config))
