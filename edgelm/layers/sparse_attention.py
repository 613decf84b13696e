"""InfLLM v2 block-sparse attention (MiniCPM4, arXiv 2506.07900 / 2509.24663): a selector + an executor.

Selector, per query position t and KV head (all query heads of a GQA group share one selection):
    kernels   k̄_i = mean(K[i·s : i·s + p])                 p = kernel_size, s = kernel_stride
              visible to t iff the whole kernel is in the past: i·s + p - 1 <= t
    score_i   = Σ_{heads h of the group} softmax_i(q_h · k̄_i · scale)     (over visible kernels)
    block_j   = max over the kernels overlapping block j = [j·m, (j+1)·m)   (m = block_size)
              = max_pool1d(score, kernel m/s + p/s - 1, stride m/s, padding p/s - 1)  (5, 4, 1 for 64/32/16)
    selected  = init blocks ∪ blocks overlapping the last window_size positions
                ∪ top-k of the remaining causal blocks (ties: lower block index)
Executor: softmax attention over every token of the selected blocks that is <= t. Queries that see
fewer than dense_len keys (t + 1 < dense_len) use plain dense attention with the same weights, so a
model is dense-sparse switchable and the result does not depend on how a prompt is chunked.

References beside the fast paths: `select_blocks_reference` (per-query loops over the definition)
and `sparse_attention_reference` (dense attention with the selection as a boolean mask).

Shapes: B batch, H query heads, Hkv KV heads, G = H / Hkv, C queries, S keys, D head dim,
nk kernels, nb blocks.
"""

import dataclasses

import torch
import torch.nn.functional as F

from edgelm import kernels
from edgelm.cache.kv import KVCache
from edgelm.layers.attention import CAUSAL, ForwardContext, attend, attend_reference

NEG_INF = float("-inf")

# CLI short names -> SparseConfig fields ("block=64,topk=16,window=512,dense_len=1024")
ALIASES = {
    "block": "block_size",
    "kernel": "kernel_size",
    "stride": "kernel_stride",
    "init": "init_blocks",
    "window": "window_size",
    "chunk": "query_chunk",
}


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """InfLLM v2 settings; field names and defaults are MiniCPM4's `sparse_config`.

    `query_chunk` (queries per executor step in prefill) changes speed and memory, never results.
    """

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    query_chunk: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"sparse attention {f.name}={value!r}: must be an integer")
        for name in ("block_size", "kernel_size", "kernel_stride", "topk", "window_size", "query_chunk"):
            self._require(name, getattr(self, name) > 0, "must be positive")
        self._require("init_blocks", self.init_blocks >= 0, "must be >= 0")
        self._require("dense_len", self.dense_len >= 0, "must be >= 0")
        stride = self.kernel_stride
        self._require("kernel_stride", self.block_size % stride == 0, f"must divide block_size {self.block_size}")
        self._require("kernel_size", self.kernel_size % stride == 0, f"must be a multiple of kernel_stride {stride}")

    def _require(self, name: str, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"sparse attention {name}={getattr(self, name)}: {what}")

    @classmethod
    def from_dict(cls, d: dict) -> "SparseConfig":
        """From MiniCPM4's config.json `sparse_config` (unknown keys ignored)."""
        if d.get("use_nope"):
            raise ValueError("sparse_config use_nope=true (block scores without RoPE) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def parse(cls, text: str) -> "SparseConfig":
        """From a CLI string such as "block=64,topk=16,window=512,dense_len=1024" (missing = defaults)."""
        if text.strip() == "default":
            return cls()
        names, values = {f.name for f in dataclasses.fields(cls)}, {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            key = ALIASES.get(key.strip(), key.strip())
            if not sep or key not in names:
                raise ValueError(
                    f"bad sparse attention setting {item!r}: use key=value with keys "
                    f"{', '.join(sorted(names | set(ALIASES)))}"
                )
            try:
                values[key] = int(value)
            except ValueError:
                raise ValueError(f"sparse attention {key}={value.strip()!r}: must be an integer") from None
        return cls(**values)

    # Max-pool over kernel scores that gives each block the max of the kernels overlapping it.
    @property
    def pool_stride(self) -> int:
        return self.block_size // self.kernel_stride

    @property
    def pool_padding(self) -> int:
        return self.kernel_size // self.kernel_stride - 1

    @property
    def pool_kernel(self) -> int:
        return self.pool_stride + self.pool_padding

    def kernel_args(self) -> list[int]:
        """The settings as the C++ kernels take them (`kernels/cpu.cpp` SparseCfg)."""
        return [self.block_size, self.kernel_size, self.kernel_stride, self.init_blocks, self.window_size, self.topk,
                self.dense_len]


def num_kernels(length: int, kernel_size: int, stride: int) -> int:
    """Complete kernels over `length` keys."""
    return max(0, (length - kernel_size) // stride + 1)


def compress_keys(k: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Mean-pooled key kernels: k (B, Hkv, S, D) -> (B, Hkv, nk, D)."""
    n = num_kernels(k.shape[2], kernel_size, stride)
    if n == 0:
        return k.new_zeros(*k.shape[:2], 0, k.shape[3])
    return k.unfold(2, kernel_size, stride).mean(-1)  # (B, Hkv, nk, D, p) -> mean over the window


# --- selector ------------------------------------------------------------------------------------


def kernel_visibility(pos: torch.Tensor, nk: int, cfg: SparseConfig) -> torch.Tensor:
    """(C, nk) True where kernel i lies entirely at or before query position pos[c]."""
    ends = torch.arange(nk) * cfg.kernel_stride + cfg.kernel_size - 1
    return ends[None, :] <= pos[:, None]


def kernel_scores(q: torch.Tensor, kernels: torch.Tensor, pos: torch.Tensor, cfg: SparseConfig, scale: float):
    """Per-group summed kernel probabilities (B, Hkv, C, nk), -inf where a kernel is not visible."""
    B, H, C, D = q.shape
    Hkv, nk = kernels.shape[1], kernels.shape[2]
    G = H // Hkv
    qs = (q.float() * scale).reshape(B, Hkv, G * C, D)
    logits = (qs @ kernels.float().transpose(-1, -2)).view(B, Hkv, G, C, nk)
    # kernels before `first` are visible to every query of the chunk: mask only the tail
    first = min(nk, num_kernels(int(pos[0]) + 1, cfg.kernel_size, cfg.kernel_stride))
    hidden = ~kernel_visibility(pos, nk, cfg)[:, first:]  # (C, nk - first)
    logits[..., first:].masked_fill_(hidden, NEG_INF)
    scores = logits.softmax(-1).sum(2)  # (B, Hkv, C, nk); NaN rows (nothing visible) masked next
    scores[..., first:].masked_fill_(hidden, NEG_INF)
    return scores


def pool_blocks(scores: torch.Tensor, num_blocks: int, cfg: SparseConfig) -> torch.Tensor:
    """Kernel scores (..., nk) -> block scores (..., nb): block j takes the max over kernels
    [j·r - pad, j·r - pad + K) (r = pool stride, K = pool kernel), i.e. those overlapping it."""
    r, pad = cfg.pool_stride, cfg.pool_padding
    right = num_blocks * r - scores.shape[-1]
    assert right >= 0, "a visible kernel starts beyond the last block"
    padded = F.pad(scores, (pad, right), value=NEG_INF)  # (..., nb·r + pad)
    return padded.unfold(-1, cfg.pool_kernel, r).amax(-1)


def forced_blocks(pos: torch.Tensor, num_blocks: int, cfg: SparseConfig) -> torch.Tensor:
    """(C, nb) init blocks and blocks overlapping [t - window + 1, t], causal."""
    j = torch.arange(num_blocks)[None, :]
    t = pos[:, None]
    local = ((j + 1) * cfg.block_size - 1 >= t - cfg.window_size + 1) & (j * cfg.block_size <= t)
    return (j < cfg.init_blocks) & (j * cfg.block_size <= t) | local


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True for the k largest finite scores along the last dim; ties go to the lower index."""
    if k >= scores.shape[-1]:
        return scores > NEG_INF
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    above = scores > kth
    ties = (scores == kth) & (kth > NEG_INF)
    room = k - above.sum(-1, keepdim=True)
    return above | (ties & (ties.cumsum(-1) <= room))


def select_blocks(q: torch.Tensor, kernels: torch.Tensor, pos: torch.Tensor, cfg: SparseConfig, scale: float):
    """Block selection for queries q (B, H, C, D) at positions pos (C,) -> bool (B, Hkv, C, nb),
    nb = pos[-1] // block_size + 1. `kernels` (B, Hkv, nk, D) covers at least pos[-1] + 1 keys."""
    nb = int(pos[-1]) // cfg.block_size + 1
    nk = num_kernels(int(pos[-1]) + 1, cfg.kernel_size, cfg.kernel_stride)
    blocks = pool_blocks(kernel_scores(q, kernels[:, :, :nk], pos, cfg, scale), nb, cfg)
    causal = torch.arange(nb)[None, :] * cfg.block_size <= pos[:, None]  # (C, nb)
    forced = forced_blocks(pos, nb, cfg)
    chosen = topk_mask(blocks.masked_fill(forced | ~causal, NEG_INF), cfg.topk)
    return chosen | forced


def select_blocks_reference(q, k, pos, cfg: SparseConfig, scale: float) -> torch.Tensor:
    """The definition, one query and KV head at a time. q (B, H, C, D), raw keys k (B, Hkv, S, D)."""
    B, H, C, _ = q.shape
    Hkv = k.shape[1]
    G, m, s, p = H // Hkv, cfg.block_size, cfg.kernel_stride, cfg.kernel_size
    nb = int(pos[-1]) // m + 1
    out = torch.zeros(B, Hkv, C, nb, dtype=torch.bool)
    for b, h, c in ((b, h, c) for b in range(B) for h in range(Hkv) for c in range(C)):
        t = int(pos[c])
        starts = [i * s for i in range(t + 1) if i * s + p - 1 <= t]
        kbar = torch.stack([k[b, h, a : a + p].mean(0) for a in starts]) if starts else None
        prob = sum((q[b, h * G + g, c] @ kbar.T * scale).softmax(-1) for g in range(G)) if starts else []
        scored, forced = [], []
        for j in range(t // m + 1):
            if j < cfg.init_blocks or (j + 1) * m - 1 >= t - cfg.window_size + 1:
                forced.append(j)
                continue
            overlapping = [float(prob[i]) for i, a in enumerate(starts) if a < (j + 1) * m and a + p > j * m]
            if overlapping:
                scored.append((-max(overlapping), j))
        for j in forced + [j for _, j in sorted(scored)[: cfg.topk]]:
            out[b, h, c, j] = True
    return out


# --- references for the executor -----------------------------------------------------------------


def selection_mask(selected: torch.Tensor, pos: torch.Tensor, num_keys: int, block_size: int) -> torch.Tensor:
    """Block selection (B, Hkv, C, nb) -> token mask (B, Hkv, C, S): selected block and key <= query."""
    token_block = torch.arange(num_keys) // block_size  # (S,)
    padded = F.pad(selected, (0, max(0, int(token_block[-1]) + 1 - selected.shape[-1])))
    allowed = padded[..., token_block]
    return allowed & (torch.arange(num_keys)[None, :] <= pos[:, None])


def sparse_attention_reference(q, k, v, selected, pos, block_size: int, scale: float) -> torch.Tensor:
    """Dense attention with the selection as a boolean mask. q (B, H, C, D) -> (B, H, C, D)."""
    G = q.shape[1] // k.shape[1]
    mask = selection_mask(selected, pos, k.shape[2], block_size)  # (B, Hkv, C, S)
    return attend_reference(q, k, v, mask.repeat_interleave(G, dim=1), scale)


# --- executor ------------------------------------------------------------------------------------


def block_tokens(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block ids (B, Hkv, n) -> their token positions (B, Hkv, n·m)."""
    return (blocks[..., None] * block_size + torch.arange(block_size)).flatten(-2)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, S, D), positions idx (B, Hkv, N) -> (B, Hkv, N, D), each KV head its own positions.
    Row copies per (batch, head): ~2.5x faster on CPU than one broadcast advanced-indexing gather."""
    B, Hkv, N = idx.shape
    out = x.new_empty(B, Hkv, N, x.shape[3])
    for b in range(B):
        for h in range(Hkv):
            torch.index_select(x[b, h], 0, idx[b, h], out=out[b, h])
    return out


def attend_selected_decode(q, k, v, selected, t: int, block_size: int, scale: float) -> torch.Tensor:
    """One query per row at position t, no left padding: gather each KV head's selected blocks and
    run one SDPA over them with the group's query heads folded into the query axis. -> (B, H, 1, D)"""
    B, H, _, D = q.shape
    Hkv, m = k.shape[1], block_size
    sel = selected[:, :, 0]  # (B, Hkv, nb)
    n = int(sel[0, 0].sum())  # the same count in every row: it depends on t alone
    blocks = sel.nonzero()[:, -1].view(B, Hkv, n)  # ascending, so the query's own block is last
    tok = block_tokens(blocks, m)[..., : n * m - (m - 1 - t % m)]  # cut the own block's future
    kg, vg = gather_tokens(k, tok), gather_tokens(v, tok)  # (B, Hkv, N, D)
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), kg, vg, scale=scale)
    return out.reshape(B, H, 1, D)


def attend_selected(q, k, v, selected, pos, block_size: int, scale: float, left_pad=None) -> torch.Tensor:
    """Queries q (B, H, C, D) at positions pos (C,), each over its own selected blocks: per KV head the
    union of the chunk's blocks is gathered, and a mask keeps each query's selection and causality.
    Memory is O(C · union), never O(S²). -> (B, H, C, D)"""
    B, H, C, D = q.shape
    Hkv, m = k.shape[1], block_size
    union = selected.any(2)  # (B, Hkv, nb)
    n = int(union.sum(-1).max())
    # selected blocks first (ascending); shorter rows are padded with unselected, fully masked blocks
    blocks = torch.argsort(union.to(torch.uint8), dim=-1, descending=True, stable=True)[..., :n]
    tok = block_tokens(blocks, m)  # (B, Hkv, N)
    allowed = selected.gather(-1, blocks[:, :, None, :].expand(B, Hkv, C, n)).repeat_interleave(m, -1)
    key, query = tok[:, :, None, :], pos[:, None]  # (B, Hkv, 1, N), (C, 1)
    allowed = allowed & (key <= query)  # (B, Hkv, C, N)
    if left_pad is not None:
        lp = left_pad[:, None, None, None]
        # padding queries would see no key at all (NaN softmax): let them see themselves
        allowed = (allowed & (key >= lp)) | ((key == query) & (query < lp))
    tok = tok.clamp(max=k.shape[2] - 1)  # the own block's future positions: masked above
    kg, vg = gather_tokens(k, tok), gather_tokens(v, tok)
    G = H // Hkv
    # an additive float mask, made before the G-fold copy: SDPA would convert a bool one after it
    bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, NEG_INF)
    mask = bias[:, :, None].expand(B, Hkv, G, C, -1).reshape(B, Hkv, G * C, -1)
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, G * C, D), kg, vg, attn_mask=mask, scale=scale)
    return out.view(B, H, C, D)


def sparse_attend(q, k, v, kernels, pos, cfg: SparseConfig, scale: float, left_pad=None) -> torch.Tensor:
    """Select blocks for queries q (B, H, C, D) at positions pos (C,) and attend to exactly them.
    k/v (B, Hkv, S, D) hold every key from position 0; kernels = compress_keys(k) (or a prefix of it
    covering pos[-1] + 1 keys)."""
    selected = select_blocks(q, kernels, pos, cfg, scale)
    if len(pos) == 1 and left_pad is None:
        return attend_selected_decode(q, k, v, selected, int(pos[0]), cfg.block_size, scale)
    return attend_selected(q, k, v, selected, pos, cfg.block_size, scale, left_pad)


def cpp_executor(q: torch.Tensor, left_pad=None):
    """The compiled kernels when they can run this call (fp32, no left padding, no autograd), else None:
    `sparse_attend` (Python, chunked) is then the executor, and the reference the C++ one is tested against."""
    if q.dtype != torch.float32 or left_pad is not None or (torch.is_grad_enabled() and q.requires_grad):
        return None
    return kernels.ext()


class SparseKVCache(KVCache):
    """A KVCache that also keeps the mean-pooled key kernels the selector scores blocks with.

    The stored keys are the kernel buffer: each call pools the kernels completed since the last one
    (one every kernel_stride tokens once kernel_size are held). trim()/restore() drop the kernels
    covering dropped positions, so rollback stays exact.
    """

    def __init__(
        self, left_pad=None, max_size: int | None = None, kernel_size: int = 32, kernel_stride: int = 16
    ):
        super().__init__(left_pad, max_size)
        self.kernel_size, self.kernel_stride = kernel_size, kernel_stride
        self.kernels: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self.num_kernels = 0

    def compressed_keys(self) -> torch.Tensor:
        """(B, Hkv, nk, D): kernels over every cached key."""
        p, s = self.kernel_size, self.kernel_stride
        n = num_kernels(self.offset, p, s)
        self.num_kernels = min(self.num_kernels, n)
        if self.num_kernels < n:
            start = self.num_kernels * s
            self._append(compress_keys(self.keys[:, :, start : (n - 1) * s + p], p, s))
        if n == 0:
            return compress_keys(self.keys[:, :, :0], p, s)  # (B, Hkv, 0, D)
        return self.kernels[:, :, :n]

    def _append(self, new: torch.Tensor) -> None:
        end = self.num_kernels + new.shape[2]
        self._grow_kernels(end, new)
        self.kernels[:, :, self.num_kernels : end] = new
        self.num_kernels = end

    def _grow_kernels(self, end: int, like: torch.Tensor) -> None:
        """Room for `end` kernels (B, Hkv, capacity, D), the current ones kept: as many as the keys'
        capacity holds, so the kernels grow with the KV buffers (1/32 of their bytes), never ahead."""
        if self.kernels is None or end > self.kernels.shape[2]:
            held = 0 if self.keys is None else self.keys.shape[2]
            size = max(end, num_kernels(held, self.kernel_size, self.kernel_stride))
            grown = like.new_empty(*like.shape[:2], size, like.shape[3])
            if self.num_kernels:
                grown[:, :, : self.num_kernels] = self.kernels[:, :, : self.num_kernels]
            self.kernels = grown

    def kernel_buffer(self, length: int) -> torch.Tensor:
        """For the fast decode step (kernels/llama.py), which pools the kernels its new keys complete
        into this buffer: current up to the cached keys, with room for those of `length` keys.
        Call `kernels_written()` after it has advanced the cache."""
        self.compressed_keys()
        self._grow_kernels(num_kernels(length, self.kernel_size, self.kernel_stride), self.keys)
        return self.kernels

    def kernels_written(self) -> None:
        self.num_kernels = num_kernels(self.offset, self.kernel_size, self.kernel_stride)

    def _drop_stale_kernels(self) -> None:
        self.num_kernels = min(
            self.num_kernels, num_kernels(self.offset, self.kernel_size, self.kernel_stride)
        )

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self._drop_stale_kernels()
        return n

    def restore(self, state) -> None:
        super().restore(state)
        self._drop_stale_kernels()

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self.kernels is None else self.kernels.nbytes)


class SparseAttention:
    """The executor an `Attention` layer calls instead of dense attention (`attn.sparse`), set by
    `CausalLM.set_sparse_attention` or by a MiniCPM4 `sparse_config`. Stateless: one per model."""

    def __init__(self, config: SparseConfig):
        self.config = config

    def make_cache(self, left_pad=None, max_size: int | None = None) -> SparseKVCache:
        return SparseKVCache(left_pad, max_size, self.config.kernel_size, self.config.kernel_stride)

    def kernels(self, k: torch.Tensor, cache) -> torch.Tensor:
        cfg = self.config
        if isinstance(cache, SparseKVCache) and (cache.kernel_size, cache.kernel_stride) == (
            cfg.kernel_size,
            cfg.kernel_stride,
        ):
            return cache.compressed_keys()
        return compress_keys(k, cfg.kernel_size, cfg.kernel_stride)  # any other cache: from scratch

    def __call__(self, q, k, v, cache, ctx: ForwardContext, scale: float) -> torch.Tensor:
        """q (B, H, L, D) at positions [offset, offset + L); k/v (B, Hkv, offset + L, D) -> (B, H, L, D)."""
        cfg, L, S = self.config, q.shape[2], k.shape[2]
        assert S == ctx.offset + L, "sparse attention needs every key from position 0"
        num_dense = min(L, max(0, cfg.dense_len - 1 - ctx.offset))  # queries with t + 1 < dense_len
        if num_dense == L:
            return attend(q, k, v, ctx.mask(0, S, None), scale)  # exactly the dense layer
        parts = []
        if num_dense:
            end, mask = ctx.offset + num_dense, ctx.mask(0, S, None)
            dense_mask = mask if mask is CAUSAL else mask[..., :num_dense, :end]
            parts.append(attend(q[:, :, :num_dense], k[:, :, :end], v[:, :, :end], dense_mask, scale))
        pooled = self.kernels(k, cache)
        fast = cpp_executor(q, left_pad=ctx.left_pad)
        if fast is not None:  # every sparse query in one C++ call: selection + attention per (query, KV head)
            pos0 = ctx.offset + num_dense
            parts.append(fast.sparse_attention(q[:, :, num_dense:], k, v, pooled, pos0, cfg.kernel_args(), scale))
        else:
            for start in range(num_dense, L, cfg.query_chunk):
                stop = min(L, start + cfg.query_chunk)
                pos = torch.arange(ctx.offset + start, ctx.offset + stop)
                parts.append(sparse_attend(q[:, :, start:stop], k, v, pooled, pos, cfg, scale, ctx.left_pad))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
