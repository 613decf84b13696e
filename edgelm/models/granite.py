"""Granite 3.x / 4.0 dense attention models: Llama with μP multipliers.

Granite names the scalars the way llama.py does (embedding_multiplier, residual_multiplier,
attention_multiplier as the softmax scale, logits divided by logits_scaling), so it is the Llama
model with Granite's defaults.
"""

import dataclasses

from edgelm.models import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0


Model = llama.Model
