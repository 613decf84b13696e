"""GGUF tensors -> quantized modules, straight from the raw GGML blocks, a chunk of rows at a time
(never the whole fp32 matrix).

    Q4_0, Q4_1, Q4_K -> Int4Linear, group 32: the same 4-bit codes, re-expressed as
                        W = (q - 8) * scale + zero; exact up to rounding scale and zero to bf16
                        (|W - W_gguf| <= 2^-9 * (8 |scale| + |zero|) per group). Row counts
                        that are not a multiple of 16 take the int8 route below.
    Q8_0, Q5_K, Q6_K (and any other type gguf-py dequantizes)
                     -> Int8Linear per output channel, re-quantized from the dequantized rows:
                        |W - W_gguf| <= scale_row / 2, scale_row ~= max|row| / 127 (bf16).
    F32, F16, BF16   -> plain nn.Linear.

Block layouts (gguf-py's gguf/quants.py; ggml-quants.c), each block covering 32 weights unless said:
    Q4_0  18 B: d fp16 | 16 B codes; weight j < 16 in the low nibble of byte j, j >= 16 in the
          high nibble of byte j - 16.  w = d * (q - 8)
    Q4_1  20 B: d fp16 | m fp16 | 16 B codes (same nibble order).  w = d * q + m
    Q4_K  144 B per 256 weights: d fp16 | dmin fp16 | 12 B of 6-bit (scale, min) pairs for the 8
          sub-blocks of 32 | 128 B codes: byte run i (32 B) holds sub-block 2i in its low nibbles
          and sub-block 2i + 1 in its high nibbles.  w = d * sc_j * q - dmin * m_j
"""

import numpy as np
import torch
from torch import nn

from edgelm.formats.gguf import GGUFTensor
from edgelm.quant.linear import Int4Linear, Int8Linear, default_int4_layout
from edgelm.quant.primitives import INT4_ROW_MULTIPLE, check_int4_shape, quantize_int8
from edgelm.quant.quantize import record_quantization, set_module, tie_quantized_embeddings, tied_embeddings

DENSE_TYPES = ("F32", "F16", "BF16")
GROUP_SIZE = 32  # every exact int4 type maps onto 32-weight groups
REPACK_CHUNK_ROWS = 1024  # multiple of 64 (CPU int4 packing blocks); bounds fp32 temporaries


def _fp16(raw: np.ndarray) -> torch.Tensor:
    """(..., 2) uint8 holding fp16 values -> (...) fp32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles_32(codes: np.ndarray) -> torch.Tensor:
    """(R, B, 16) code bytes of Q4_0/Q4_1 blocks -> (R, B * 32) codes in weight order."""
    q = np.concatenate([codes & 15, codes >> 4], axis=-1)  # low nibbles: weights 0..15
    return torch.from_numpy(q.reshape(codes.shape[0], -1))


def _decode_q4_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = raw.reshape(raw.shape[0], -1, 18)  # (R, B, 18)
    d = _fp16(b[..., 0:2])  # (R, B)
    return _nibbles_32(b[..., 2:]), d, torch.zeros_like(d)


def _decode_q4_1(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = raw.reshape(raw.shape[0], -1, 20)
    d, m = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    return _nibbles_32(b[..., 4:]), d, m + 8 * d  # d*q + m == (q - 8)*d + (m + 8d)


def _decode_q4_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gguf.quants import Q4_K

    R = raw.shape[0]
    b = raw.reshape(R, -1, 144)  # (R, S, 144) super-blocks
    d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])  # (R, S)
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))  # (R*S, 8) 6-bit ints
    scale = d[..., None] * torch.from_numpy(sc.astype(np.float32)).reshape(R, -1, 8)  # (R, S, 8)
    low_sub = dmin[..., None] * torch.from_numpy(mn.astype(np.float32)).reshape(R, -1, 8)
    codes = b[..., 16:].reshape(R, -1, 4, 1, 32)
    q = np.concatenate([codes & 15, codes >> 4], axis=3)  # (R, S, 4, 2, 32): sub-block 2i, 2i+1
    zero = 8 * scale - low_sub  # d*sc*q - dmin*m == (q - 8)*d*sc + (8*d*sc - dmin*m)
    return torch.from_numpy(q.reshape(R, -1)), scale.reshape(R, -1), zero.reshape(R, -1)


INT4_DECODERS = {"Q4_0": _decode_q4_0, "Q4_1": _decode_q4_1, "Q4_K": _decode_q4_k}


def _raw_rows(t: GGUFTensor) -> np.ndarray:
    return np.asarray(t.data).reshape(t.shape[0], -1)  # (N, bytes per row)


def _bias(bias) -> torch.Tensor | None:
    return bias.to_torch(torch.float32) if isinstance(bias, GGUFTensor) else bias


def repack_int4(t: GGUFTensor, bias=None) -> Int4Linear:
    """Q4_0 / Q4_1 / Q4_K -> Int4Linear (group 32), one chunk of rows at a time."""
    N, K = t.shape
    check_int4_shape(N, K, GROUP_SIZE)
    decode, raw = INT4_DECODERS[t.type_name], _raw_rows(t)
    layout = default_int4_layout()
    packed, sz = [], []
    for i in range(0, N, REPACK_CHUNK_ROWS):
        q, scale, zero = decode(raw[i : i + REPACK_CHUNK_ROWS])  # (R, K) codes, (R, K/32) fp32
        p, s = Int4Linear.pack(q, scale, zero, GROUP_SIZE, layout)
        packed.append(p)
        sz.append(s)
    sz = torch.cat(sz, dim=Int4Linear.scale_row_dim(layout))
    return Int4Linear.from_packed(torch.cat(packed), sz, GROUP_SIZE, _bias(bias), layout)


def dequantize_gguf_rows(t: GGUFTensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a GGUF tensor as fp32 (R, K), through gguf-py (the reference)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[t.type_name]
    arr = gguf.quants.dequantize(np.ascontiguousarray(_raw_rows(t)[start:stop]), qtype)
    return torch.from_numpy(np.ascontiguousarray(arr)).reshape(stop - start, t.shape[1])


def requantize_int8(t: GGUFTensor, bias=None) -> Int8Linear:
    """Any GGUF type gguf-py can dequantize -> Int8Linear per channel, a chunk of rows at a time."""
    N, _ = t.shape
    parts = [quantize_int8(dequantize_gguf_rows(t, i, min(i + REPACK_CHUNK_ROWS, N))) for i in range(0, N, REPACK_CHUNK_ROWS)]
    q, scales = (torch.cat(p) for p in zip(*parts))
    return Int8Linear.from_quantized(q, scales, _bias(bias))  # packed into the runtime layout once


def module_for_gguf_tensor(t: GGUFTensor, bias=None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A linear computing x @ W^T (+ bias) for a 2-D GGUF weight `t` (rows = out_features).
    `bias`: None, a tensor, or a GGUFTensor. `dtype` applies to dense (F32/F16/BF16) weights only."""
    if len(t.shape) != 2:
        raise ValueError(f"{t.name}: a linear weight must be 2-D, got shape {t.shape}")
    if t.type_name in DENSE_TYPES:
        w = t.to_torch(dtype)
        b = _bias(bias)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            linear.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        return linear
    if t.type_name in INT4_DECODERS and t.shape[0] % INT4_ROW_MULTIPLE == 0:
        return repack_int4(t, bias)
    return requantize_int8(t, bias)  # also 4-bit types with a row count int4 packing cannot take


def _weight_for(name: str, weights: dict, tied_to: str | None):
    if name in weights:
        return weights[name]
    return weights.get(f"{tied_to}.weight") if tied_to else None


def repack_gguf_model(model: nn.Module, weights: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap every nn.Linear whose GGUF weight is quantized for its repacked module, in place.

    `weights` is {HF name: GGUFTensor or tensor}, as `gguf_tensors` returns; the entries consumed
    (weights, biases, and a tied embedding's table) are popped, so the caller assigns the rest as
    usual. A tied LM head is built from the embedding's tensor, and the embedding then reads its
    rows (QuantizedEmbedding, returning `dtype`). The layout goes to `model.config.quantization`
    (method "gguf").
    """
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear_to_emb = {lin: emb for emb, lin in tied_embeddings(model, linears).items()}
    ties, swapped = {}, False
    for path in linears:
        emb = linear_to_emb.get(path)
        t = _weight_for(f"{path}.weight", weights, emb)
        if not (isinstance(t, GGUFTensor) and t.is_quantized):
            continue
        set_module(model, path, module_for_gguf_tensor(t, weights.pop(f"{path}.bias", None)))
        weights.pop(f"{path}.weight", None)
        swapped = True
        if emb is not None:
            weights.pop(f"{emb}.weight", None)
            ties[emb] = path
    tie_quantized_embeddings(model, ties, dtype)
    if swapped:
        record_quantization(model, "gguf", GROUP_SIZE, symmetric=None)  # per tensor type
    return model
