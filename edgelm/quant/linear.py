"""Weight-only quantized linears (int4 group-wise, int8 per channel) and a quantized embedding.

Each module keeps `dequantize()` -> fp32 (out, in) weight as its plain reference: `forward(x)`
equals `F.linear(x, dequantize(), bias)` up to the bf16 rounding of activations and outputs
(tests/test_quant.py). Activations of any shape (..., in) and dtype fp32/bf16 go in; the same
dtype comes out.

Which path runs: the int kernels dequantize each weight once per 4 rows of x, so their cost grows
linearly with M, while dequantize-then-fp32-GEMM pays one dequantization per call and then runs
~2x faster per row. Measured on the 2-core AVX2 dev box (Zen 3, no AVX-512/AMX), 1 thread, CPU
time (medians; the box was shared), ms per call; k = int kernel, d = dequantize + fp32 F.linear:
    rows M   1536 x 576 (gate/up)                576 x 1536 (down)
             fp32   int4 k / d   int8 k / d      fp32   int4 k / d   int8 k / d
    32       1.0    1.6 / 3.4    1.6 / 1.4       1.0    1.6 / 3.7    1.5 / 1.3
    128      4.7    6.1 / 7.2    6.2 / 4.3       3.2    6.0 / 7.3    6.0 / 4.2
    192      5.3    10  / 7.2    9.1 / 5.5       4.7    9.1 / 8.8    12  / 6.3
    256      6.1    13  / 9.0    12  / 6.7       5.8    12  / 8.7    12  / 8.8
int8 dequantizes in 0.2 ms per 1M weights, int4 in ~2 ms (reading codes back from the packed
layout is a gather), hence the different thresholds (`dequant_min_rows`) below.
"""

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.quant.primitives import (
    PACK_ROWS,
    SCALE_DTYPE,
    check_int4_shape,
    check_int8_shape,
    dequantize_int4,
    dequantize_int8,
    merge_scales_and_zeros,
    pack_int4,
    pack_int4_for_cpu,
    quantize_int4,
    quantize_int8,
    split_scales_and_zeros,
    unpack_int4,
    unpack_int4_from_cpu,
    unpack_int4_rows_from_cpu,
)

QUANTIZE_CHUNK_ROWS = 4096  # rows quantized at a time: bounds the fp32 temporaries of from_float


def _bias_param(bias: torch.Tensor | None, out_features: int, has_bias: bool) -> nn.Parameter | None:
    if bias is not None:
        return nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    if has_bias:
        return nn.Parameter(torch.empty(out_features), requires_grad=False)
    return None


class _QuantLinear(nn.Module):
    """Shared forward policy: int kernel for few rows (decode), dense weight for many (prefill)."""

    dequant_min_rows: int  # rows of x (batch * tokens) from which the dense path wins; see above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.dequant_min_rows:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantize(x.dtype), bias)
        x2 = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()  # kernels want (M, K) bf16
        y = self.kernel(x2).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"


class Int4Linear(_QuantLinear):
    """W[n, k] = (q[n, k] - 8) * scale[n, k // group_size] + zero[n, k // group_size], q in 0..15.

    Runtime buffers: `packed` (N, K/2) uint8 in torch's CPU int4pack layout, and
    `scales_and_zeros` (K/group_size, N, 2) bf16, the kernel's own operands, 0.5 byte per weight.
    The packed layout depends on the CPU's ISA (AVX2 and AVX-512 builds interleave rows
    differently), so it is never saved: `state_dict()` holds `qweight` (N, K/2) uint8 in the
    portable `pack_int4` order (byte j = q[2j] | q[2j+1] << 4), unpacked from `packed` on save and
    repacked for this machine on load. Keeping both at runtime would double the weight memory.
    """

    dequant_min_rows = 160  # crossover between M = 128 and 192 (module docstring)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32):
        check_int4_shape(out_features, in_features, group_size)
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        self.register_buffer("packed", packed, persistent=False)
        sz = torch.empty(in_features // group_size, out_features, 2, dtype=SCALE_DTYPE)
        self.register_buffer("scales_and_zeros", sz)
        self.bias = _bias_param(None, out_features, bias)

    @classmethod
    def from_packed(cls, packed, scales_and_zeros, group_size: int, bias=None) -> "Int4Linear":
        """From the kernel's operands: packed (N, K/2) CPU layout, scales_and_zeros (G, N, 2)."""
        m = cls(packed.shape[1] * 2, packed.shape[0], bias is not None, group_size)
        m.packed, m.scales_and_zeros = packed, scales_and_zeros.to(SCALE_DTYPE).contiguous()
        m.bias = _bias_param(bias, m.out_features, bias is not None)
        return m

    @classmethod
    def from_quantized(cls, q, scales, zeros, group_size: int, bias=None) -> "Int4Linear":
        """q (N, K) uint8 0..15, scales and zeros (N, K/group_size): W = (q - 8) * scale + zero."""
        check_int4_shape(*q.shape, group_size)
        return cls.from_packed(pack_int4_for_cpu(q), merge_scales_and_zeros(scales, zeros), group_size, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32, symmetric: bool = False) -> "Int4Linear":
        w = linear.weight.detach()
        check_int4_shape(*w.shape, group_size)
        parts = [
            quantize_int4(w[i : i + QUANTIZE_CHUNK_ROWS], group_size, symmetric)
            for i in range(0, len(w), QUANTIZE_CHUNK_ROWS)
        ]
        q, scales, zeros = (torch.cat(p) for p in zip(*parts))
        return cls.from_quantized(q, scales, zeros, group_size, linear.bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def codes(self) -> torch.Tensor:
        """q (N, K) uint8 0..15, read back from the packed layout."""
        return unpack_int4_from_cpu(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference weight (N, K): exactly what the kernel multiplies by (before its own
        fp32 accumulation order)."""
        scales, zeros = split_scales_and_zeros(self.scales_and_zeros)
        return dequantize_int4(self.codes(), scales, zeros, self.group_size, dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 rows W[rows] (R, K), reading only those rows (embedding lookups)."""
        scales, zeros = split_scales_and_zeros(self.scales_and_zeros)
        q = unpack_int4_rows_from_cpu(self.packed, rows)
        return dequantize_int4(q, scales[rows], zeros[rows], self.group_size)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # scales_and_zeros, bias
        destination[prefix + "qweight"] = pack_int4(self.codes())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "qweight"
        if key in state_dict:
            self.packed = pack_int4_for_cpu(unpack_int4(state_dict[key]))
        elif strict:
            missing.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}  # `packed` is not a saved name
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class Int8Linear(_QuantLinear):
    """W[n, k] = qweight[n, k] * scales[n]: int8 codes, one bf16 scale per output channel.
    `qweight` is a plain (N, K) int8 matrix, portable as is: the buffers are what state_dict saves."""

    dequant_min_rows = 32  # the dense path already wins at M = 32 (module docstring)

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        check_int8_shape(out_features, in_features)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE))
        self.bias = _bias_param(None, out_features, bias)

    @classmethod
    def from_quantized(cls, qweight, scales, bias=None) -> "Int8Linear":
        """qweight (N, K) int8, scales (N,): W = qweight * scales[:, None]."""
        m = cls(qweight.shape[1], qweight.shape[0], bias is not None)
        m.qweight, m.scales = qweight.to(torch.int8).contiguous(), scales.to(SCALE_DTYPE).contiguous()
        m.bias = _bias_param(bias, m.out_features, bias is not None)
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        return cls.from_weight(linear.weight.detach(), linear.bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias=None) -> "Int8Linear":
        """Quantize a float (N, K) weight, a chunk of rows at a time."""
        check_int8_shape(*w.shape)
        parts = [quantize_int8(w[i : i + QUANTIZE_CHUNK_ROWS]) for i in range(0, len(w), QUANTIZE_CHUNK_ROWS)]
        q, scales = (torch.cat(p) for p in zip(*parts))
        return cls.from_quantized(q, scales, bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(self.qweight[rows], self.scales[rows])


QUANTIZED_LINEARS = (Int4Linear, Int8Linear)


class QuantizedEmbedding(nn.Module):
    """Embedding lookups served by the rows of a quantized (vocab, hidden) linear, so a quantized
    table needs no fp32 copy. An Int8Linear row is exactly an int8 embedding row with its own
    scale (per-output-channel scale of the LM head == per-row scale of the embedding).

    `tied=True` (weight tying): `table` is the model's LM head. It is referenced, not registered
    as a submodule, so state_dict() stores the table once, under the LM head's name.
    """

    def __init__(self, table: Int4Linear | Int8Linear, tied: bool = False, dtype=torch.float32):
        super().__init__()
        if tied:
            self._tied = (table,)  # a tuple attribute is invisible to nn.Module registration
        else:
            self.table = table
        self.tied, self.out_dtype = tied, dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "QuantizedEmbedding":
        """An int8 table with its own storage (1 byte per weight + one scale per token)."""
        table = Int8Linear.from_weight(embedding.weight.detach())
        return cls(table, dtype=embedding.weight.dtype)

    @property
    def source(self) -> Int4Linear | Int8Linear:
        return self._tied[0] if self.tied else self.table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.source.dequantize_rows(tokens.reshape(-1))  # (B * L, hidden) fp32
        return rows.to(self.out_dtype).reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied={self.tied}"


def to_quantized(linear: nn.Linear, method: str, group_size: int = 32, symmetric: bool = False) -> nn.Module:
    """The one swap contract: an nn.Linear -> its quantized replacement for `method`."""
    if method == "int4":
        return Int4Linear.from_float(linear, group_size, symmetric)
    if method == "int8":
        return Int8Linear.from_float(linear)
    raise ValueError(f"unknown quantization method {method!r}; use 'int4' or 'int8'")


def fuse_quantized(linears: list[nn.Module]) -> Int4Linear | Int8Linear | None:
    """Concatenate same-kind quantized linears along the output (the q/k/v or gate/up fusion);
    None when they cannot share one kernel (mixed kinds or group sizes, as in Q4_K_M files)."""
    first = linears[0]
    same = all(type(m) is type(first) and m.in_features == first.in_features for m in linears)
    if not same or not isinstance(first, QUANTIZED_LINEARS):
        return None
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears])
    if isinstance(first, Int8Linear):
        return Int8Linear.from_quantized(
            torch.cat([m.qweight for m in linears]), torch.cat([m.scales for m in linears]), bias
        )
    if any(m.group_size != first.group_size for m in linears):
        return None
    if all(m.out_features % PACK_ROWS == 0 for m in linears):  # row blocks pack independently: join as is
        packed = torch.cat([m.packed for m in linears])
    else:
        packed = pack_int4_for_cpu(torch.cat([m.codes() for m in linears]))
    sz = torch.cat([m.scales_and_zeros for m in linears], dim=1)  # (G, sum N, 2)
    return Int4Linear.from_packed(packed, sz, first.group_size, bias)
