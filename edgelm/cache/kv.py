"""Key/value caches: a growable one and a sliding-window one (Gemma 3 local layers, Mistral)."""

import torch


class KVCache:
    """Keys and values for one attention layer, (B, Hkv, capacity, D), grown in `step` chunks.

    Memory of positions >= offset is dead: trim() and restore() only move `offset`.
    """

    step = 256

    def __init__(self, left_pad: torch.Tensor | None = None, max_size: int | None = None):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.offset = 0
        self.left_pad = left_pad
        self.max_size = max_size  # preallocate this many positions on first use (static cache)

    def _grow(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        B, H, _, D = k.shape
        size = max(needed, self.max_size or 0)
        size = (size + self.step - 1) // self.step * self.step
        new_k = k.new_empty(B, H, size, D)
        new_v = v.new_empty(B, H, size, v.shape[-1])
        if self.keys is not None and self.offset:
            new_k[:, :, : self.offset] = self.keys[:, :, : self.offset]
            new_v[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = new_k, new_v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, L, D) -> all keys/values so far (B, Hkv, offset + L, D) as views."""
        end = self.offset + k.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(k, v, end)
        self.keys[:, :, self.offset : end] = k
        self.values[:, :, self.offset : end] = v
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reserve(self, B: int, H: int, D: int, end: int, like: torch.Tensor) -> None:
        """Make room for positions [0, end) (B, H, D, `like`'s dtype) without writing: for writers
        that fill the buffers themselves (the fast decode step), then call `advance`."""
        if self.keys is None or end > self.keys.shape[2]:
            empty = like.new_empty(B, H, 0, D)
            self._grow(empty, empty, end)

    def advance(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def keep(self, start: int, kept: list[int]) -> None:
        """After a tree verify wrote nodes to slots [start, offset): keep the slots start + kept[j]
        (ascending: an accepted path) at start + j and drop the rest."""
        src = torch.tensor(kept, dtype=torch.long) + start
        dst = start + len(kept)
        if self.keys is not None and kept != list(range(len(kept))):
            self.keys[:, :, start:dst] = self.keys[:, :, src]
            self.values[:, :, start:dst] = self.values[:, :, src]
        self.offset = dst

    def snapshot(self) -> int:
        return self.offset

    def restore(self, state: int) -> None:
        self.offset = state

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class SlidingWindowKVCache(KVCache):
    """Keeps only what a window of `window` tokens can still see, plus `slack` for trim().

    Stored keys cover absolute positions [start, offset). Older keys are dropped (by a copy to the
    front) once more than `window + slack + step` are held, so memory stays O(window).
    """

    def __init__(self, window: int, left_pad: torch.Tensor | None = None, slack: int = 256):
        super().__init__(left_pad)
        self.window, self.slack = window, slack
        self.start = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.offset - self.start
        end = held + k.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._compact()
            held = self.offset - self.start
            end = held + k.shape[2]
            if self.keys is None or end > self.keys.shape[2]:
                self._grow_held(k, v, end)
        self.keys[:, :, held:end] = k
        self.values[:, :, held:end] = v
        self.offset += k.shape[2]
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _compact(self) -> None:
        """Drop keys no future query can see (keeping `slack` more for trim)."""
        keep_from = max(self.start, self.offset - (self.window - 1) - self.slack)
        drop = keep_from - self.start
        if self.keys is None or drop <= 0:
            return
        held = self.offset - keep_from
        self.keys[:, :, :held] = self.keys[:, :, drop : drop + held].clone()
        self.values[:, :, :held] = self.values[:, :, drop : drop + held].clone()
        self.start = keep_from

    def _grow_held(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        held = self.offset - self.start
        saved_offset, self.offset = self.offset, held  # _grow copies [:offset]
        self._grow(k, v, needed)
        self.offset = saved_offset

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if self.offset - n - (self.window - 1) < self.start and self.start > 0:
            raise ValueError(
                f"cannot trim {n} tokens from a sliding-window cache holding positions "
                f"[{self.start}, {self.offset}) with window {self.window}; use snapshot/restore"
            )
        self.offset -= n
        return n

    def snapshot(self):
        keys = None if self.keys is None else self.keys[:, :, : self.offset - self.start].clone()
        values = None if self.values is None else self.values[:, :, : self.offset - self.start].clone()
        return self.offset, self.start, keys, values

    def restore(self, state) -> None:
        self.offset, self.start, keys, values = state
        if keys is not None:
            self.keys[:, :, : keys.shape[2]] = keys
            self.values[:, :, : values.shape[2]] = values
