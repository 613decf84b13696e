"""The fast decode step for Llama-family models: every layer in one C++ call (`cpu.cpp`).

The module path (`models/llama.py`) stays the reference and the fallback. The fast step runs when
a forward feeds few new tokens (decode, batched decode, speculative verify, short prompts:
B * L <= MAX_ROWS), without autograd, on a model whose pieces it knows: fused qkv and gate/up
projections, SiLU, plain RMSNorm, rotary or no position embedding, dense fp32 / int4 ("blocks"
layout) / int8 linears, full attention over a KV cache it can write into, or InfLLM v2 sparse
attention over a SparseKVCache (block selection and attention over the chosen blocks in C++), and
a speculative draft tree's verify (`ForwardContext.tree`: tree positions and an ancestor mask).
Anything else (sliding windows, q/k norms, left padding, bf16 caches, ...) returns None and the
module path runs.

Per token it saves the ~1,000 Python-dispatched ops of a 30-layer model (docs/profile-smollm2.md);
tests/test_kernels.py checks it against the module path.
"""

import weakref

import torch
from torch import nn

from edgelm import kernels
from edgelm.cache import KVCache
from edgelm.layers.sparse_attention import SparseKVCache

# B * L above this: long prompt chunks, where the module path's GEMMs are as fast. Measured on
# SmolLM2-135M (2 threads): the one call is 1.4-2.3x the module path for 17-64-token prompts (fp32
# and GGUF int4) and still 1.2x at 128 for int4 (its tile kernels beat dequantize + GEMM there).
MAX_ROWS = 128
# model -> (key, C++ decoder or None); outside the model so that deepcopy/pickle never see it
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _kernel_linear(m: nn.Module):
    """The C++ Linear that runs `m`, or None: dense fp32 weights as they are, quantized modules
    through their own `kernel_handle()` (the handle their forward already uses)."""
    if type(m) is nn.Linear:
        return kernels.dense_handle(m)
    handle = getattr(m, "kernel_handle", None)
    return handle() if handle is not None else None


def _layer_parts(layer) -> tuple[list, list] | None:
    from edgelm.models.llama import DecoderLayer

    if type(layer) is not DecoderLayer:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    ok = (
        attn.qkv_proj is not None
        and attn.q_norm is None
        and attn.window is None
        and attn.softcap is None
        and getattr(mlp, "gate_up_proj", None) is not None
        and mlp.act is torch.nn.functional.silu
        and not layer.input_layernorm.offset
        and not layer.post_attention_layernorm.offset
    )
    if not ok:
        return None
    linears = [_kernel_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(lin is None for lin in linears):
        return None
    norms = [layer.input_layernorm.weight.detach().float(), layer.post_attention_layernorm.weight.detach().float()]
    return linears, norms


def _key(model) -> tuple:
    """What invalidates a built decoder: swapped modules (quantize, fuse, sparse) or new buffers
    (checked on the first and last layers: those edits touch every layer)."""
    first, last = model.layers[0], model.layers[-1]
    qkv = first.self_attn.qkv_proj
    w = None if qkv is None else getattr(qkv, "packed", getattr(qkv, "qweight", getattr(qkv, "weight", None)))
    return (len(model.layers), id(qkv), id(last.mlp.down_proj), id(last.self_attn.o_proj),
            _sparse_of(first), _sparse_of(last), None if w is None else w.data_ptr())


def _sparse_of(layer):
    return None if layer.self_attn.sparse is None else layer.self_attn.sparse.config


def _sparse_config(model):
    """The layers' shared SparseConfig, None when dense, False when they differ."""
    configs = {_sparse_of(layer) for layer in model.layers}
    return configs.pop() if len(configs) == 1 else False


def build(model):
    """A C++ LlamaDecoder for `model`, or None when the kernels or the model do not allow one."""
    ext = kernels.ext()
    if ext is None or not hasattr(model, "layers") or not len(model.layers):
        return None
    linears, norms = [], []
    for layer in model.layers:
        parts = _layer_parts(layer)
        if parts is None:
            return None
        linears += parts[0]
        norms += parts[1]
    attn = model.layers[0].self_attn
    rope_dim = attn.rope.dim if attn.rope is not None else 0
    if any(layer.self_attn.rope is not attn.rope for layer in model.layers):
        return None
    norm = model.model.norm
    sparse = _sparse_config(model)
    if norm.offset or norm.eps != model.layers[0].input_layernorm.eps or sparse is False:
        return None
    decoder = ext.LlamaDecoder(
        linears,
        norms,
        norm.weight.detach().float().contiguous(),
        attn.num_heads,
        attn.num_kv_heads,
        attn.head_dim,
        rope_dim,
        float(norm.eps),
        float(attn.scale),
        float(model.layers[0].residual_multiplier),
    )
    if sparse is not None:
        c = sparse
        decoder.set_sparse(c.block_size, c.kernel_size, c.kernel_stride, c.init_blocks, c.window_size, c.topk, c.dense_len)
    return decoder


_VIEWS: tuple = ()  # the engine's cache views, imported on first use (edgelm.engine imports a lot)


def _cache_plan(cache: list, B: int, L: int, like: torch.Tensor, shape: tuple[int, int], sparse=None):
    """(keys, values, per-row offsets (B,), commit, kernel buffers) for every layer's cache, capacity
    ensured, or None when the caches are not a kind the fast step writes (fp32 KVCache, the
    engine's views; with sparse attention only a SparseKVCache pooling with the same kernels)."""
    global _VIEWS
    if not _VIEWS:
        from edgelm.engine.runner import _RowsView, _SlotView

        _VIEWS = (_SlotView, _RowsView)
    kind, first = type(cache[0]), cache[0]
    if any(type(c) is not kind for c in cache):
        return None
    if sparse is not None:
        if kind is not SparseKVCache or (first.kernel_size, first.kernel_stride) != (sparse.kernel_size, sparse.kernel_stride):
            return None
    if kind is KVCache or kind is SparseKVCache:
        if first.left_pad is not None:
            return None
        end = first.offset + L
        for c in cache:
            if c.keys is None or end > c.keys.shape[2]:
                c.reserve(B, *shape, end, like)
        if first.keys.dtype != torch.float32 or first.keys.shape[0] != B:
            return None
        offsets = torch.full((B,), first.offset, dtype=torch.long)
        pooled = [c.kernel_buffer(end) for c in cache] if sparse is not None else []

        def commit():
            for c in cache:
                c.advance(L)
                if sparse is not None:
                    c.kernels_written()

        return [c.keys for c in cache], [c.values for c in cache], offsets, commit, pooled
    if sparse is not None or kind not in _VIEWS or first.keys.dtype != torch.float32 or first.offset + L > first.keys.shape[2]:
        return None
    if kind is _VIEWS[0]:  # one engine slot (prefill chunk)
        s = first.slot
        offsets = torch.full((B,), first.offset, dtype=torch.long)
        return [c.keys[s : s + 1] for c in cache], [c.values[s : s + 1] for c in cache], offsets, None, []
    return [c.keys[:B] for c in cache], [c.values[:B] for c in cache], first.row_offsets, None, []  # slots [0, B)


def hidden_states(model, tokens: torch.Tensor, cache, ctx):
    """The fast step's final-norm hidden states (B, L, hidden), or None to take the module path."""
    B, L = tokens.shape
    if B * L > MAX_ROWS or not cache or ctx.left_pad is not None or torch.is_grad_enabled():
        return None
    if model.__dict__.get("fast_decode", True) is False or not kernels.enabled():
        return None
    key = _key(model)
    cached = _DECODERS.get(model)
    if cached is None or cached[0] != key:
        cached = _DECODERS[model] = (key, build(model))
    decoder = cached[1]
    if decoder is None:
        return None
    attn = model.layers[0].self_attn
    h = model.model.embed_tokens(tokens)
    if h.dtype != torch.float32:
        return None
    sparse = key[4]  # the layers' SparseConfig (or None; build() refuses mixed ones), part of the key
    plan = _cache_plan(cache, B, L, h, (attn.num_kv_heads, attn.head_dim), sparse)
    if plan is None:
        return None
    keys, values, offsets, commit, kernel_buffers = plan
    if model.config.embedding_multiplier != 1.0:
        h = h * model.config.embedding_multiplier
    rope = attn.rope
    inv_freq, scale = (rope._inv_freq_for(ctx.positions), rope.scale) if rope is not None else (_NO_ROPE, 1.0)
    out = decoder.forward(h.reshape(B * L, -1), inv_freq, scale, offsets, L, keys, values, kernel_buffers, ctx.tree)
    if commit is not None:
        commit()
    return out.view(B, L, -1)


_NO_ROPE = torch.empty(0)
