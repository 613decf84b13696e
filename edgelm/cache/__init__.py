"""Per-layer caches. Every cache follows one small protocol, so generation, speculative decoding
and batching work the same on every architecture:

    offset            tokens seen so far (in the padded coordinates of the batch)
    left_pad          (B,) LongTensor of left-padding per row, or None
    row_offsets       optional: (B,) LongTensor of tokens cached per row when rows differ
                      (the batched engine's slot cache); absent or None otherwise
    update(...)       append this step's state and return what the layer attends to
    trim(n)           forget the last n tokens (speculative rollback); returns n trimmed
    snapshot()        an opaque state; restore(state) goes back to it
    nbytes            bytes of memory the cache holds
"""

from edgelm.cache.kv import KVCache, SlidingWindowKVCache
from edgelm.cache.ssm import MambaCache

__all__ = ["KVCache", "MambaCache", "SlidingWindowKVCache"]
