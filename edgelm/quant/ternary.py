"""Ternary weights (BitCPM): W ≈ t · s with t in {-1, 0, +1}, one scale per group of 32 inputs.

Quantizer (BitCPM follow-up report, ../shared/docs/TECHNIQUES.md §3): per group g of a row,
    s_g = max(mean |W_g|, ε),   t = clamp(round(W / s_g), -1, 1)
and for training the straight-through estimator W + sg(t·s - W): the forward sees the ternary
weight, the gradient flows to the latent full-precision W as if quantization were the identity.

`BitLinear` is the inference module: codes packed 4 to a byte (2 bits per weight, code = t + 1,
weight 4j + i in bits 2i..2i+1 of byte j) plus fp16 group scales (0.5 bit per weight at group 32).
Its packed matmul never expands the weight: for each activation row it builds a table of the 256
possible dot products of 4 consecutive inputs with 4 ternary digits (a (K/4, 256) lookup table, as
T-MAC / bitnet.cpp's LUT kernels do), then each output is a sum of K/4 table reads selected by the
code bytes, and the group sums are scaled. Reference: unpack, scale, F.linear (`dequantize`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

TERNARY_GROUP = 32
EPS = 1e-5  # the ε of s = max(mean|W|, ε): all-zero groups stay zero


def check_ternary_shape(out_features: int, in_features: int, group_size: int) -> None:
    if group_size < 4 or group_size % 4 or in_features % group_size:
        raise ValueError(
            f"ternary group_size {group_size} must be a multiple of 4 dividing in_features {in_features} "
            f"(weight ({out_features}, {in_features})); leave this layer out with a predicate"
        )


def ternary_params(w: torch.Tensor, group_size: int = TERNARY_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (t int8 (N, K) in {-1, 0, 1}, scales fp32 (N, K / group_size))."""
    N, K = w.shape
    check_ternary_shape(N, K, group_size)
    g = w.float().reshape(N, K // group_size, group_size)  # (N, G, group)
    s = g.abs().mean(-1).clamp_min(EPS)  # (N, G)
    t = torch.round(g / s[..., None]).clamp(-1, 1).to(torch.int8)
    return t.reshape(N, K), s


def ternary_values(t: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """(t (N, K), scales (N, G)) -> W (N, K) fp32."""
    N, K = t.shape
    w = t.reshape(N, K // group_size, group_size).float() * scales.float()[..., None]
    return w.reshape(N, K)


def fake_ternary(w: torch.Tensor, group_size: int = TERNARY_GROUP) -> torch.Tensor:
    """The STE forward weight: ternary values, identity gradient to the latent w."""
    t, s = ternary_params(w.detach(), group_size)
    return w + (ternary_values(t, s, group_size).to(w.dtype) - w).detach()


class TernaryLinear(nn.Linear):
    """Training-time (QAT) linear: a latent fp32 weight, used through `fake_ternary`."""

    group_size = TERNARY_GROUP

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = TERNARY_GROUP) -> "TernaryLinear":
        check_ternary_shape(linear.out_features, linear.in_features, group_size)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        m.weight = nn.Parameter(linear.weight.detach().float().clone())
        m.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        m.group_size = group_size
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_ternary(self.weight, self.group_size), self.bias)


# ---- packing -----------------------------------------------------------------------------------


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """t (N, K) in {-1, 0, 1} -> (N, K/4) uint8: byte j = Σ_i (t[4j + i] + 1) << 2i."""
    c = (t.to(torch.int16) + 1).to(torch.uint8).reshape(t.shape[0], -1, 4)  # (N, K/4, 4) codes 0..2
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_ternary`: (N, K/4) uint8 -> t (N, K) int8 (the plain reference)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    c = (packed[..., None] >> shifts) & 3  # (N, K/4, 4)
    return (c.view(torch.int8) - 1).reshape(packed.shape[0], -1)


def decode_ternary(packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """The dense weight W (N, K) in one table lookup per byte (4 digits at once): the same values
    as `ternary_values(unpack_ternary(packed), ...)`, ~1.6x faster."""
    N, J = packed.shape
    t = F.embedding(packed.to(torch.int32), _digits(dtype).T.contiguous())  # (N, K/4, 4)
    w = t.reshape(N, -1, group_size) * scales.to(dtype)[..., None]  # (N, G, group)
    return w.reshape(N, 4 * J)


@functools.lru_cache(maxsize=4)
def _digits(dtype: torch.dtype) -> torch.Tensor:
    """(4, 256): the ternary digit i of byte value v, ((v >> 2i) & 3) - 1 (code 3 never occurs)."""
    v = torch.arange(256)
    return torch.stack([((v >> (2 * i)) & 3) - 1 for i in range(4)]).to(dtype)


def lut_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) @ Wᵀ from the packed codes without expanding W: (M, N).

    table[m, j, v] = Σ_i x[m, 4j + i] · digit_i(v)   (M, K/4 · 256), one small matmul;
    partial[m, n, j] = table[m, j, packed[n, j]]     (M, N, K/4), one gather;
    y[m, n] = Σ_g scales[n, g] Σ_{j in g} partial[m, n, j].
    """
    M, K = x.shape
    N, J = packed.shape
    table = (x.reshape(M, J, 4) @ _digits(x.dtype)).reshape(M, J * 256)
    index = packed.long() + _row_offsets(J)  # (N, K/4): byte j selects in table row j
    partial = table[:, index]  # (M, N, K/4)
    sums = partial.reshape(M, N, K // group_size, group_size // 4).sum(-1)  # (M, N, G)
    return (sums * scales.to(x.dtype)).sum(-1)


@functools.lru_cache(maxsize=16)
def _row_offsets(J: int) -> torch.Tensor:
    return torch.arange(0, J * 256, 256)


class BitLinear(nn.Module):
    """Inference linear with packed ternary weights: W = t · s, 2 bits per weight + fp16 scales.

    Buffers (also the saved format, portable as is): `qweight` (N, K/4) uint8, `scales` (N, G)
    fp16. One row (decode) runs `lut_matmul`; more rows decode W once per call (`decode_ternary`)
    and run one dense GEMM, whose cost does not grow with the rows the way table building does.
    """

    dense_min_rows = 2  # the table costs grow with the rows: only decode (1 row) uses it

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = TERNARY_GROUP):
        check_ternary_shape(out_features, in_features, group_size)
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 4, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group_size, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int | None = None) -> "BitLinear":
        """Ternarize an nn.Linear (or a trained TernaryLinear, with its own group size)."""
        group_size = group_size or getattr(linear, "group_size", TERNARY_GROUP)
        t, s = ternary_params(linear.weight.detach(), group_size)
        return cls.from_ternary(t, s, group_size, linear.bias)

    @classmethod
    def from_ternary(cls, t: torch.Tensor, scales: torch.Tensor, group_size: int, bias=None) -> "BitLinear":
        N, K = t.shape
        m = cls(K, N, bias is not None, group_size)
        m.qweight, m.scales = pack_ternary(t), scales.to(torch.float16)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return m

    def codes(self) -> torch.Tensor:
        return unpack_ternary(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference weight (N, K): unpack, then scale."""
        return ternary_values(self.codes(), self.scales, self.group_size).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return ternary_values(unpack_ternary(self.qweight[rows]), self.scales[rows], self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.dense_min_rows:
            y = F.linear(x, decode_ternary(self.qweight, self.scales, self.group_size, x.dtype))
        else:
            x2 = x.reshape(rows, self.in_features)
            y = lut_matmul(x2, self.qweight, self.scales, self.group_size).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


# ---- whole models ------------------------------------------------------------------------------


def is_ternary_target(path: str, module: nn.Module) -> bool:
    """The decoder layers' linears (the LM head and the embedding stay out, as in BitCPM)."""
    return ".layers." in f".{path}" and isinstance(module, nn.Linear)


def swap_linears(model: nn.Module, make, predicate=None) -> dict[str, nn.Module]:
    """Replace every nn.Linear matching `predicate` (default: decoder layers) by make(linear)."""
    from edgelm.quant.quantize import set_module

    predicate = predicate or is_ternary_target
    targets = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear) and predicate(p, m)}
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to ternarize")
    for p, m in targets.items():
        check_ternary_shape(m.out_features, m.in_features, getattr(m, "group_size", TERNARY_GROUP))
    for p, m in targets.items():
        set_module(model, p, make(m))
    return targets


def finish_ternary(model: nn.Module, group_size: int, head: str | None = "int8") -> nn.Module:
    """Quantize the LM head (its tied embedding reads its rows) and record the layout."""
    from edgelm.quant.quantize import can_quantize, quantize_model, record_quantization

    if head is not None:
        quantize_model(model, head, predicate=lambda p, m: p == "lm_head" and can_quantize(m, head))
    record_quantization(model, "ternary", group_size, None)
    return model


def ternarize_model(model: nn.Module, group_size: int = TERNARY_GROUP, predicate=None,
                    head: str | None = "int8") -> nn.Module:
    """Post-training ternarization: decoder linears -> BitLinear, LM head -> `head` (int8) or kept."""
    swap_linears(model, lambda m: BitLinear.from_float(m, group_size), predicate)
    return finish_ternary(model, group_size, head)
