"""Weight-only quantized linears (int4 group-wise, int8 per channel) and a quantized embedding.

Each module keeps `dequantize()` -> fp32 (out, in) weight as its plain reference: `forward(x)`
equals `F.linear(x, dequantize(), bias)` up to the rounding of activations (tests/test_quant.py,
tests/test_kernels.py). Activations of any shape (..., in) and dtype fp32/bf16 go in; the same
dtype comes out.

Which path runs: the int kernels cost grows linearly with the rows M of x (each weight block is
unpacked once and dotted with every row), while dequantize-then-fp32-GEMM pays one dequantization
per call and then runs faster per row, so `dequant_min_rows` switches to it for prompts.

Kernels: with edgelm's C++ kernels built (edgelm/kernels, the default on x86-64 with a compiler),
int4 uses the "blocks" layout and both int4 and int8 multiply fp32 activations rounded to int16 per
32-block (~1e-5 relative, unlike llama.cpp's int8 activations, ~1% per matmul); without them,
torch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` run on bf16 activations. Measured on
the 2-core AVX2 dev box (Zen 3), 1 thread, ms per call (python benchmarks/kernels.py):
    shape (N x K)      M   int4 edgelm / torch   int8 edgelm / torch   fp32 F.linear
    3072 x 576         1   0.28 / 0.45           0.23 / 0.40           0.72
    49152 x 576        1   4.2  / 7.1            4.1  / 8.7            13.8
    49152 x 576        8   25.7 / 31.1           23.2 / 32.1           51.7
    8192 x 2048        1   2.4  / 4.2            2.9  / 4.1            5.1
torch's layout dequantizes slowly (~2 ms per 1M weights: its packed order needs a gather), hence
its higher threshold.
"""

import operator
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from edgelm import kernels
from edgelm.quant.primitives import (
    BLOCK,
    PACK_ROWS,
    TILE,
    SCALE_DTYPE,
    check_int4_shape,
    check_int8_shape,
    dequantize_int4,
    dequantize_int8,
    expand_to_blocks,
    blocks_to_groups,
    merge_scales_and_zeros,
    pack_int4,
    pack_int4_blocks,
    pack_int4_for_cpu,
    pack_int8_tiles,
    quantize_int4,
    quantize_int8,
    split_scales_and_zeros,
    unpack_int4,
    unpack_int4_blocks,
    unpack_int4_from_cpu,
    unpack_int4_rows_from_cpu,
    unpack_int8_tiles,
)

QUANTIZE_CHUNK_ROWS = 4096  # rows quantized at a time: bounds the fp32 temporaries of from_float


def _bias_param(bias: torch.Tensor | None, out_features: int, has_bias: bool) -> nn.Parameter | None:
    if bias is not None:
        return nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    if has_bias:
        return nn.Parameter(torch.empty(out_features), requires_grad=False)
    return None


def default_int4_layout() -> str:
    """"blocks" (edgelm's kernels, ~2x torch's int4 GEMV on AVX2) when they are built, else "torch"."""
    return "blocks" if kernels.available() else "torch"


class _QuantLinear(nn.Module):
    """Shared forward policy: int kernel for few rows (decode), dense weight for many (prefill)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.dequant_min_rows:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dense_weight(x.dtype), bias)
        return self.kernel(x.reshape(rows, self.in_features)).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """`dequantize()` for the prompt path: edgelm's C++ pass (bit-identical; 2.3x faster than the
        torch ops for int4) when the kernels run this module, else the reference itself."""
        handle = self.kernel_handle()
        if handle is None:
            return self.dequantize(dtype)
        return kernels.ext().dequantize(handle).to(dtype)

    def kernel_handle(self):
        """The C++ Linear for this module, or None when edgelm's kernels do not run it."""
        return None

    def lookup_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """`dequantize_rows` (the reference) for embedding lookups: one C++ call when the kernels run
        this module (bit-identical; a decode token's row in ~1 us instead of ~0.4 ms of torch ops)."""
        handle = self.kernel_handle()
        if handle is None:
            return self.dequantize_rows(rows)
        return kernels.ext().dequantize_rows(handle, rows.reshape(-1).long())

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N): edgelm's kernel (int16 activations per 32-block) when it runs this
        module, else torch's (`torch_kernel`, bf16 activations)."""
        handle = self.kernel_handle()
        if handle is not None:
            return kernels.ext().linear(handle, x.float())
        return self.torch_kernel(x)

    def _edgelm_kernel(self, kind: int, w: torch.Tensor, s: torch.Tensor):
        """The C++ kernel's handle for these buffers (rebuilt when a buffer is replaced). Kept
        outside the module's __dict__ so that copy.deepcopy and pickling never see it."""
        return kernels.linear_handle(self, kind, w, s, self.bias)

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"


def _torch_kernel(fn, x: torch.Tensor, *args, bias=None) -> torch.Tensor:
    """torch's weight-only kernels want (M, K) bf16 and add no bias."""
    y = fn(x.to(torch.bfloat16).contiguous(), *args)
    return y if bias is None else y + bias.to(y.dtype)


class Int4Linear(_QuantLinear):
    """W[n, k] = (q[n, k] - 8) * scale[n, k // group_size] + zero[n, k // group_size], q in 0..15.

    Two runtime layouts, 0.5 byte per weight plus scales, chosen by `layout`:
    - "blocks" (default when edgelm's kernels are built): `packed` (N, K/2) uint8 in the kernels'
      block layout (`pack_int4_blocks`) and `block_sz` (N, K/32, 2) bf16, one (scale, zero) pair
      per 32-block. Activations stay fp32; the kernel quantizes them to int8 per 32-block.
    - "torch": `packed` in torch's ISA-specific CPU int4pack layout and `scales_and_zeros`
      (K/group_size, N, 2) bf16, for `torch._weight_int4pack_mm_for_cpu` with bf16 activations.
    Neither runtime layout is saved: `state_dict()` holds `qweight` (N, K/2) uint8 in the portable
    `pack_int4` order (byte j = q[2j] | q[2j+1] << 4) and `scales_and_zeros` (G, N, 2) bf16,
    converted on save and on load. Keeping two layouts at runtime would double the weight memory.
    """

    # rows of x from which dequantize + fp32 GEMM beats the int kernel (module docstring; the
    # blocks kernel's cost grows ~linearly in rows, so its crossover is lower)
    min_rows = {"blocks": 24, "torch": 160}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32, layout=None):
        check_int4_shape(out_features, in_features, group_size)
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = layout or default_int4_layout()
        self.dequant_min_rows = self.min_rows[self.layout]
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8), persistent=False)
        if self.layout == "blocks":
            sz = torch.empty(out_features, in_features // BLOCK, 2, dtype=SCALE_DTYPE)
            self.register_buffer("block_sz", sz, persistent=False)
        else:
            sz = torch.empty(in_features // group_size, out_features, 2, dtype=SCALE_DTYPE)
            self.register_buffer("scales_and_zeros", sz, persistent=False)
        self.bias = _bias_param(None, out_features, bias)

    @staticmethod
    def pack(q, scales, zeros, group_size: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes q (R, K) and scales/zeros (R, G) -> this layout's (packed, scales) for R rows.
        Chunks of a multiple of 64 rows (or the last chunk) pack independently: join packed along
        dim 0 and scales along `scale_row_dim`."""
        if layout == "blocks":
            return pack_int4_blocks(q), expand_to_blocks(scales, zeros, group_size)
        return pack_int4_for_cpu(q), merge_scales_and_zeros(scales, zeros)

    @staticmethod
    def scale_row_dim(layout: str) -> int:
        return 0 if layout == "blocks" else 1

    @classmethod
    def from_packed(cls, packed, sz, group_size: int, bias=None, layout: str | None = None) -> "Int4Linear":
        """From one layout's buffers (`pack`); `layout` None means the default layout."""
        layout = layout or default_int4_layout()
        N, K = packed.shape[0], packed.shape[1] * 2
        m = cls(K, N, bias is not None, group_size, layout)
        m.packed = packed.contiguous()
        if layout == "blocks":
            m.block_sz = sz.to(SCALE_DTYPE).contiguous()
        else:
            m.scales_and_zeros = sz.to(SCALE_DTYPE).contiguous()
        m.bias = _bias_param(bias, m.out_features, bias is not None)
        return m

    @classmethod
    def from_quantized(cls, q, scales, zeros, group_size: int, bias=None, layout: str | None = None) -> "Int4Linear":
        """q (N, K) uint8 0..15, scales and zeros (N, K/group_size): W = (q - 8) * scale + zero."""
        check_int4_shape(*q.shape, group_size)
        layout = layout or default_int4_layout()
        return cls.from_packed(*cls.pack(q, scales, zeros, group_size, layout), group_size, bias, layout)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32, symmetric: bool = False) -> "Int4Linear":
        return cls.from_weight(linear.weight.detach(), linear.bias, group_size, symmetric)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias=None, group_size: int = 32, symmetric: bool = False) -> "Int4Linear":
        """Quantize a float (N, K) weight, a chunk of rows at a time."""
        check_int4_shape(*w.shape, group_size)
        parts = [
            quantize_int4(w[i : i + QUANTIZE_CHUNK_ROWS], group_size, symmetric)
            for i in range(0, len(w), QUANTIZE_CHUNK_ROWS)
        ]
        q, scales, zeros = (torch.cat(p) for p in zip(*parts))
        return cls.from_quantized(q, scales, zeros, group_size, bias)

    def kernel_handle(self):
        return self._edgelm_kernel(1, self.packed, self.block_sz) if self.layout == "blocks" else None

    def torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        return _torch_kernel(torch._weight_int4pack_mm_for_cpu, x, self.packed, self.group_size, sz, bias=self.bias)

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scales, zeros (N, G) bf16."""
        if self.layout == "blocks":
            return blocks_to_groups(self.block_sz, self.group_size)
        return split_scales_and_zeros(self.scales_and_zeros)

    def codes(self) -> torch.Tensor:
        """q (N, K) uint8 0..15, read back from the packed layout."""
        if self.layout == "blocks":
            return unpack_int4_blocks(self.packed)
        return unpack_int4_from_cpu(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference weight (N, K): exactly what the kernel multiplies by (before its own
        accumulation order and, for "blocks", the int16 rounding of activations)."""
        scales, zeros = self.scales_zeros()
        return dequantize_int4(self.codes(), scales, zeros, self.group_size, dtype)

    def select_rows(self, rows: torch.Tensor) -> "Int4Linear":
        """A module of only output rows `rows`, same codes, scales and layout (an FR-Spec head:
        it stays 4-bit, so it reads len(rows)/N of the bytes)."""
        q = unpack_int4_blocks(self.packed, rows) if self.layout == "blocks" else self.codes()[rows]
        scales, zeros = (t[rows] for t in self.scales_zeros())
        bias = None if self.bias is None else self.bias.detach()[rows]
        return Int4Linear.from_quantized(q, scales, zeros, self.group_size, bias, self.layout)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 rows W[rows] (R, K), reading only those rows (embedding lookups)."""
        if self.layout == "blocks":
            q = unpack_int4_blocks(self.packed, rows)
            scales, zeros = blocks_to_groups(self.block_sz, self.group_size, rows)
        else:
            q = unpack_int4_rows_from_cpu(self.packed, rows)
            scales, zeros = (t[rows] for t in self.scales_zeros())
        return dequantize_int4(q, scales, zeros, self.group_size)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        destination[prefix + "qweight"] = pack_int4(self.codes())
        destination[prefix + "scales_and_zeros"] = merge_scales_and_zeros(*self.scales_zeros())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        qkey, skey = prefix + "qweight", prefix + "scales_and_zeros"
        if qkey in state_dict and skey in state_dict:
            scales, zeros = split_scales_and_zeros(state_dict[skey])
            q = unpack_int4(state_dict[qkey])
            self.packed, sz = self.pack(q, scales, zeros, self.group_size, self.layout)
            if self.layout == "blocks":
                self.block_sz = sz
            else:
                self.scales_and_zeros = sz
        elif strict:
            missing.extend(k for k in (qkey, skey) if k not in state_dict)
        rest = {k: v for k, v in state_dict.items() if k not in (qkey, skey)}  # not registered names
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}"


def default_int8_layout(in_features: int) -> str:
    """"tiles" (edgelm's kernels) when they are built and K is a multiple of 32, else "plain"."""
    return "tiles" if kernels.available() and in_features % BLOCK == 0 else "plain"


class Int8Linear(_QuantLinear):
    """W[n, k] = q[n, k] * scales[n]: int8 codes, one bf16 scale per output channel.

    `qweight` (N, K) int8 holds the codes in the runtime `layout`: "plain" (row-major, what
    torch._weight_int8pack_mm takes) or "tiles" (edgelm's kernels: rows interleaved in tiles of 8,
    `pack_int8_tiles`). `codes()` reads them back in row order; state_dict always saves the plain
    matrix under `qweight`, so files are portable whatever the runtime layout."""

    dequant_min_rows = 24  # the dense path already wins at M = 32 (module docstring)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, layout: str | None = None):
        check_int8_shape(out_features, in_features)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.layout = layout or default_int8_layout(in_features)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE))
        self.bias = _bias_param(None, out_features, bias)

    @classmethod
    def from_quantized(cls, qweight, scales, bias=None, layout: str | None = None) -> "Int8Linear":
        """qweight (N, K) int8 codes in row order, scales (N,): W = qweight * scales[:, None]."""
        m = cls(qweight.shape[1], qweight.shape[0], bias is not None, layout)
        m.qweight, m.scales = m._to_layout(qweight.to(torch.int8)), scales.to(SCALE_DTYPE).contiguous()
        m.bias = _bias_param(bias, m.out_features, bias is not None)
        return m

    def _to_layout(self, q: torch.Tensor) -> torch.Tensor:
        return pack_int8_tiles(q) if self.layout == "tiles" else q.contiguous()

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The int8 codes (N, K) in row order (or only `rows`)."""
        if self.layout == "tiles":
            return unpack_int8_tiles(self.qweight, rows)
        return self.qweight if rows is None else self.qweight[rows]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.codes()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + "qweight" in state_dict:
            self.qweight = self._to_layout(self.qweight)  # loaded in row order

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

    def kernel_handle(self):
        return self._edgelm_kernel(2, self.qweight, self.scales) if self.layout == "tiles" else None

    def torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return _torch_kernel(torch._weight_int8pack_mm, x, self.codes(), self.scales, bias=self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.codes(), self.scales, dtype)

    def select_rows(self, rows: torch.Tensor) -> "Int8Linear":
        """A module of only output rows `rows`, same codes and scales (see Int4Linear.select_rows)."""
        bias = None if self.bias is None else self.bias.detach()[rows]
        return Int8Linear.from_quantized(self.codes(rows), self.scales[rows], bias, self.layout)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(self.codes(rows), self.scales[rows])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"


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
        rows = self.source.lookup_rows(tokens.reshape(-1))  # (B * L, hidden) fp32
        return rows.to(self.out_dtype).reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied={self.tied}"


# QuantizedExperts -> {expert: (its buffers, (C++ handle, kernel module) or None)}; outside the
# modules so that copy.deepcopy and pickling never see the handles (as kernels.linear_handle)
_EXPERT_HANDLES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class QuantizedExperts(nn.Module):
    """A MoE's stacked expert weight (E, out, in) (`ExpertWeights`: `input_linear` or
    `output_linear`) as one Int4Linear / Int8Linear per expert, same codes and group sizes as the
    linears. `grouped_experts` runs each active expert's rows on that expert's own int kernel
    (`self.experts[e](x)`; many rows dequantize that one expert only, the linears' prompt policy),
    so the stack is never expanded to fp32. state_dict: `<name>.experts.<e>.qweight` (+ scales)
    per expert, each in its linear's portable format; the layout entry is the linear's plus
    "experts": E (quantize.py)."""

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        def kind(m):
            return type(m), m.out_features, m.in_features, getattr(m, "group_size", None)

        first = experts[0]
        if any(kind(m) != kind(first) for m in experts):
            raise ValueError("QuantizedExperts: every expert must be the same kind, shape and group size")
        self.experts = nn.ModuleList(experts)
        self._list = tuple(experts)  # plain indexing for the decode path (ModuleList's is slower)
        self.num_experts = len(experts)
        self.out_features, self.in_features = first.out_features, first.in_features

    @classmethod
    def from_float(cls, w: torch.Tensor, method: str, group_size: int = 32, symmetric: bool = False):
        """w (E, out, in) float -> one quantized module per expert."""
        return cls([quantize_weight_module(w[e].detach(), method, group_size, symmetric) for e in range(len(w))])

    @classmethod
    def empty(cls, num_experts: int, out_features: int, in_features: int, bits: int, group_size: int = 32):
        """Uninitialised experts (on the current default device, e.g. meta) for a saved layout."""
        if bits == 4:
            return cls([Int4Linear(in_features, out_features, False, group_size) for _ in range(num_experts)])
        return cls([Int8Linear(in_features, out_features, False) for _ in range(num_experts)])

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's `forward` on x (rows, in): its int kernel for few rows, its dequantized
        weight for many (the linears' policy). The kernel is called directly through a handle
        cached per expert: an expert's matmul in decode is ~40 us, and nn.Module's call plus the
        handle lookup of `Int*Linear.forward` added ~45 us more on the dev box."""
        m = self._list[e]
        if x.shape[0] >= m.dequant_min_rows:
            return m(x)
        entry = self._handle(e, m)
        if entry is None:
            y = m.kernel(x)
        else:
            y = entry[1].linear(entry[0], x if x.dtype == torch.float32 else x.float())
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _handle(self, e: int, m: nn.Module):
        """(C++ handle, kernel module) of expert e, or None when edgelm's kernels do not run it.
        Rebuilt when one of the expert's buffers is replaced (load_state_dict, .to())."""
        cache = _EXPERT_HANDLES.get(self)
        if cache is None:
            cache = _EXPERT_HANDLES[self] = {}
        buffers = tuple(m._buffers.values())
        cached = cache.get(e)
        if cached is None or len(cached[0]) != len(buffers) or not all(map(operator.is_, cached[0], buffers)):
            handle = m.kernel_handle()
            cached = cache[e] = (buffers, None if handle is None else (handle, kernels.ext()))
        return cached[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference stack (E, out, in): each expert's `dequantize()`."""
        return torch.stack([m.dequantize(dtype) for m in self.experts])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}"


def quantize_weight_module(w: torch.Tensor, method: str, group_size: int = 32, symmetric: bool = False, bias=None):
    """A float (N, K) weight -> its Int4Linear / Int8Linear for `method`."""
    if method == "int4":
        return Int4Linear.from_weight(w, bias, group_size, symmetric)
    if method == "int8":
        return Int8Linear.from_weight(w, bias)
    raise ValueError(f"unknown quantization method {method!r}; use 'int4' or 'int8'")


def to_quantized(linear: nn.Linear, method: str, group_size: int = 32, symmetric: bool = False) -> nn.Module:
    """The one swap contract: an nn.Linear -> its quantized replacement for `method`."""
    return quantize_weight_module(linear.weight.detach(), method, group_size, symmetric, linear.bias)


def fuse_quantized(linears: list[nn.Module]) -> nn.Module | None:
    """Concatenate same-kind quantized linears along the output (the q/k/v or gate/up fusion);
    None when they cannot share one kernel (mixed kinds or group sizes, as in Q4_K_M files)."""
    from edgelm.quant.ternary import BitLinear  # ternary.py builds on this module

    first = linears[0]
    same = all(type(m) is type(first) and m.in_features == first.in_features for m in linears)
    if same and isinstance(first, BitLinear):
        return BitLinear.concat(linears)
    if not same or not isinstance(first, QUANTIZED_LINEARS):
        return None
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears])
    if isinstance(first, Int8Linear):
        scales = torch.cat([m.scales for m in linears])
        tiled = all(m.layout == first.layout for m in linears) and all(m.out_features % TILE == 0 for m in linears[:-1])
        if tiled:  # whole tiles (and row-major tails last) concatenate as they are
            fused = Int8Linear(first.in_features, len(scales), bias is not None, first.layout)
            fused.qweight, fused.scales = torch.cat([m.qweight for m in linears]), scales
            fused.bias = _bias_param(bias, len(scales), bias is not None)
            return fused
        return Int8Linear.from_quantized(torch.cat([m.codes() for m in linears]), scales, bias)
    if any(m.group_size != first.group_size or m.layout != first.layout for m in linears):
        return None
    layout = first.layout
    # "blocks" rows come in whole 8-row tiles (N % 16 == 0) and torch's in blocks of 64: both concatenate
    if layout == "blocks" or all(m.out_features % PACK_ROWS == 0 for m in linears):
        packed = torch.cat([m.packed for m in linears])
    else:
        packed = pack_int4_for_cpu(torch.cat([m.codes() for m in linears]))
    sz = torch.cat([m.block_sz if layout == "blocks" else m.scales_and_zeros for m in linears], Int4Linear.scale_row_dim(layout))
    return Int4Linear.from_packed(packed, sz, first.group_size, bias, layout)
