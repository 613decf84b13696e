"""Weight-only quantization: int4 / int8 linears, `quantize_model`, and GGUF repacking.

    from edgelm.quant import quantize_model
    quantize_model(model, "int4", group_size=32)   # swaps nn.Linear -> Int4Linear, records the layout
"""

from edgelm.quant.gguf import module_for_gguf_tensor, repack_gguf_model
from edgelm.quant.linear import (
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedExperts,
    fuse_quantized,
    to_quantized,
)
from edgelm.quant.quantize import (
    can_quantize,
    is_default_target,
    module_nbytes,
    quantization_layout,
    quantize_model,
    record_quantization,
    restore_quantized_layout,
)

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "QuantizedEmbedding",
    "QuantizedExperts",
    "can_quantize",
    "fuse_quantized",
    "is_default_target",
    "module_for_gguf_tensor",
    "module_nbytes",
    "quantization_layout",
    "quantize_model",
    "record_quantization",
    "repack_gguf_model",
    "restore_quantized_layout",
    "to_quantized",
]
