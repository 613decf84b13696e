"""Granite 3.x MoE (and GraniteMoeShared): every layer attention with RoPE, a fine-grained MoE
after it (plus a shared expert when `shared_intermediate_size` is set), Granite's μP multipliers.

It is the Granite 4.0-H model with no Mamba layers, so it reuses granitemoehybrid's layers.
"""

import dataclasses

from edgelm.models import granitemoehybrid

sanitize = granitemoehybrid.sanitize


@dataclasses.dataclass
class ModelArgs(granitemoehybrid.ModelArgs):
    shared_intermediate_size: int = 0  # granitemoe has none; granitemoeshared sets it

    def __post_init__(self):
        self.layer_types = ["attention"] * self.num_hidden_layers
        self.layers_block_type = None
        self.position_embedding_type = "rope"
        super().__post_init__()


Model = granitemoehybrid.Model
