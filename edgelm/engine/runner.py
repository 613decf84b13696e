"""The model runner: a slot-based batched KV cache and the two forwards the engine needs.

The cache holds, per attention layer, keys and values of shape (max_batch, Hkv, capacity, D): one
row ("slot") per running sequence, key i of a slot at position i. Active sequences occupy slots
0..n-1; freeing a slot moves the last one into it, so a decode step always runs rows [0, n).

- prefill: a sequence (batch 1) feeds a chunk of its tokens into its slot, through the ordinary
  uniform-offset forward (plain causal mask).
- decode: every active slot feeds one token in a single forward. Rows sit at different positions,
  so the layers see per-row `row_offsets` (RoPE positions) and a per-row key mask; a slot that
  takes no part (a prompt mid-prefill) gets a dummy token whose key lands past its end and is
  overwritten by its next chunk.

Memory is rectangular: capacity grows (in `step` positions) to the longest sequence, so real bytes
are up to max_batch x longest x bytes_per_token. Sliding-window layers (Gemma 3) are handled by the
mask alone: their slots keep every key, saving no memory. Only attention-only models are supported.
"""

import torch

from edgelm.layers.attention import Attention


def attention_shapes(model) -> list[tuple[int, int]]:
    """(Hkv, D) per layer; NotImplementedError for layers that are not plain attention."""
    shapes = []
    for i, layer in enumerate(model.layers):
        attn = getattr(layer, "self_attn", None)
        if not isinstance(attn, Attention):
            raise NotImplementedError(
                f"the batched engine supports attention-only models; layer {i} is {type(layer).__name__}"
            )
        if getattr(attn, "sparse", None) is not None:
            raise NotImplementedError("the batched engine does not support block-sparse attention yet")
        shapes.append((attn.num_kv_heads, attn.head_dim))
    return shapes


class _SlotView:
    """The cache protocol for one layer of a forward over one slot (prefill, batch 1)."""

    left_pad = row_offsets = None

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: int, offset: int):
        self.keys, self.values, self.slot, self.offset = keys, values, slot, offset

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (1, Hkv, L, D) -> the slot's keys/values so far (1, Hkv, offset + L, D)."""
        s, end = self.slot, self.offset + k.shape[2]
        self.keys[s, :, self.offset : end] = k[0]
        self.values[s, :, self.offset : end] = v[0]
        return self.keys[s : s + 1, :, :end], self.values[s : s + 1, :, :end]


class _RowsView:
    """The cache protocol for one layer of a forward over slots [0, n), each at its own offset."""

    left_pad = None

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, offset: int):
        self.keys, self.values, self.row_offsets = keys, values, row_offsets
        self.offset = offset  # the longest row's: keys come back padded to it

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (n, Hkv, L, D) -> keys/values (n, Hkv, offset + L, D); rows past their end are stale."""
        n, _, L, _ = k.shape
        pos = self.row_offsets[:, None] + torch.arange(L)  # (n, L)
        rows = torch.arange(n)[:, None]
        self.keys[rows, :, pos] = k.transpose(1, 2)  # indexed view is (n, L, Hkv, D)
        self.values[rows, :, pos] = v.transpose(1, 2)
        end = self.offset + L
        return self.keys[:n, :, :end], self.values[:n, :, :end]


class SlotKVCache:
    """Per-layer (num_slots, Hkv, capacity, D) key/value buffers and the length of each slot."""

    step = 256  # capacity grows in multiples of this many positions

    def __init__(self, shapes: list[tuple[int, int]], num_slots: int, dtype: torch.dtype, max_len: int):
        self.shapes, self.num_slots, self.dtype, self.max_len = shapes, num_slots, dtype, max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # tokens held by each active slot; len() is the active count
        self.capacity = 0

    @property
    def bytes_per_token(self) -> int:
        return sum(2 * h * d for h, d in self.shapes) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes allocated (all slots, full capacity)."""
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def add_slot(self) -> int:
        assert len(self.lengths) < self.num_slots, "no free slot"
        self.lengths.append(0)
        return len(self.lengths) - 1

    def free_slot(self, slot: int) -> int | None:
        """Free `slot` by moving the last slot into it; returns the slot that moved (or None)."""
        last = len(self.lengths) - 1
        moved = None
        if slot != last:
            n = self.lengths[last]
            for t in (*self.keys, *self.values):
                t[slot, :, :n] = t[last, :, :n]
            self.lengths[slot], moved = n, last
        self.lengths.pop()
        if not self.lengths:
            self._resize(0)  # idle: give the memory back
        return moved

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions in every slot (copying what is held)."""
        if needed > self.capacity:
            self._resize(min(-(-needed // self.step) * self.step, max(self.max_len, needed)))

    def _resize(self, capacity: int) -> None:
        keep = min(self.capacity, capacity)
        # zeros, not empty: masked keys still meet the values in attn @ V, and 0 * NaN is NaN.
        fresh = [torch.zeros(self.num_slots, h, capacity, d, dtype=self.dtype) for h, d in self.shapes]
        fresh_v = [torch.zeros(self.num_slots, h, capacity, d, dtype=self.dtype) for h, d in self.shapes]
        for new, old in zip(fresh + fresh_v, self.keys + self.values):
            new[:, :, :keep] = old[:, :, :keep]
        self.keys, self.values, self.capacity = fresh, fresh_v, capacity

    def slot_view(self, slot: int) -> list[_SlotView]:
        off = self.lengths[slot]
        return [_SlotView(k, v, slot, off) for k, v in zip(self.keys, self.values)]

    def rows_view(self) -> list[_RowsView]:
        offsets = torch.tensor(self.lengths, dtype=torch.long)
        return [_RowsView(k, v, offsets, max(self.lengths)) for k, v in zip(self.keys, self.values)]


class ModelRunner:
    """Runs a scheduler `Plan` on the model: prompt chunks (batch 1 each), then one batched decode."""

    def __init__(self, model, max_batch: int):
        self.model = model
        self.cache = SlotKVCache(attention_shapes(model), max_batch, model.dtype, model.context_length)
        self.slot_of: dict[int, int] = {}  # sequence id -> slot
        self.id_in_slot: list[int] = []

    @property
    def bytes_per_token(self) -> int:
        return self.cache.bytes_per_token

    @torch.inference_mode()  # the buffers are inference tensors (made in execute)
    def free(self, seq_id: int) -> None:
        slot = self.slot_of.pop(seq_id, None)
        if slot is None:
            return
        moved = self.cache.free_slot(slot)
        last_id = self.id_in_slot.pop()
        if moved is not None:
            self.id_in_slot[slot], self.slot_of[last_id] = last_id, slot

    def _slot(self, seq_id: int) -> int:
        if seq_id not in self.slot_of:
            self.slot_of[seq_id] = self.cache.add_slot()
            self.id_in_slot.append(seq_id)
        return self.slot_of[seq_id]

    @torch.inference_mode()
    def execute(self, plan) -> torch.Tensor:
        """Feed the plan's tokens; returns logits (len(plan.sampling), V) float32 in that order."""
        rows = []
        for seq, end in plan.prefills:
            done = end == seq.num_tokens
            logits = self.prefill(seq, end)
            if done:
                rows.append(logits)
        if plan.decode:
            rows.append(self.decode(plan.decode))
        return torch.cat(rows) if rows else torch.empty(0)

    @torch.inference_mode()
    def save(self, seq_id: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """A copy of a sequence's cached keys/values, per layer (Hkv, n, D) each (None: no slot)."""
        slot = self.slot_of.get(seq_id)
        if slot is None:
            return None
        n = self.cache.lengths[slot]
        return [(k[slot, :, :n].clone(), v[slot, :, :n].clone()) for k, v in zip(self.cache.keys, self.cache.values)]

    def _slot_for(self, seq) -> int:
        slot = self._slot(seq.id)
        if seq.saved_kv is not None:  # a parked sequence resuming: its cache comes back first
            self._restore(slot, seq.saved_kv)
            seq.saved_kv = None
        return slot

    def _restore(self, slot: int, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        n = saved[0][0].shape[1]
        self.cache.reserve(n)
        for (k, v), keys, values in zip(saved, self.cache.keys, self.cache.values):
            keys[slot, :, :n], values[slot, :, :n] = k, v
        self.cache.lengths[slot] = n

    def prefill(self, seq, end: int) -> torch.Tensor:
        """Feed seq.token_ids[num_cached:end] into its slot -> last position's logits (1, V)."""
        slot = self._slot_for(seq)
        tokens = torch.tensor([seq.token_ids[seq.num_cached : end]], dtype=torch.long)
        self.cache.reserve(end)
        logits = self.model(tokens, self.cache.slot_view(slot), num_logits=1)[:, -1]
        self.cache.lengths[slot] = seq.num_cached = end
        return logits

    def decode(self, seqs: list) -> torch.Tensor:
        """Feed each sequence's next token in one forward over all active slots -> logits (len, V)."""
        slots = [self._slot_for(s) for s in seqs]
        tokens = torch.zeros(len(self.cache.lengths), 1, dtype=torch.long)  # dummy rows: token 0
        for slot, seq in zip(slots, seqs):
            tokens[slot, 0] = seq.token_ids[seq.num_cached]
        self.cache.reserve(max(self.cache.lengths) + 1)
        logits = self.model(tokens, self.cache.rows_view())[:, -1]  # (n, V)
        for slot, seq in zip(slots, seqs):
            self.cache.lengths[slot] = seq.num_cached = seq.num_cached + 1
        return logits[slots]
