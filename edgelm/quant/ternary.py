"""Ternary weights (BitCPM): W ≈ t · s with t in {-1, 0, +1}, one scale per group of 32 inputs.

Quantizer (BitCPM follow-up report, ../shared/docs/TECHNIQUES.md §3): per group g of a row,
    s_g = max(mean |W_g|, ε),   t = clamp(round(W / s_g), -1, 1)
and for training the straight-through estimator W + sg(t·s - W): the forward sees the ternary
weight, the gradient flows to the latent full-precision W as if quantization were the identity.

`BitLinear` is the inference module: 2 bits per weight (code = t + 1) plus fp16 group scales (0.5 bit
per weight at group 32). Where edgelm's C++ kernels run, its codes sit in their tile order and few
rows (decode) run the int16-activation tile kernel (kernels/cpu.cpp `TernaryTiles`: 16 madd_epi16 per
32-block and row, as int4, from half the bytes). Without them, one row runs `lut_matmul`: for each
activation row a table of the 256 possible dot products of 4 consecutive inputs with 4 ternary
digits (T-MAC / bitnet.cpp's LUT idea), then each output sums K/4 table reads selected by the code
bytes. Reference for both: unpack, scale, F.linear (`dequantize`).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgelm import kernels
from edgelm.quant.linear import _QuantLinear
from edgelm.quant.primitives import BLOCK, TILE

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


def pack_ternary_tiles(t: torch.Tensor) -> torch.Tensor:
    """t (N, K) in {-1, 0, 1} -> (N, K/4) uint8 in the C++ kernel's tile order (kernels/cpu.cpp
    header; N % 8 == 0, K % 32 == 0): bytes ordered (tile, block, c, row, pair), each holding the
    codes of k = 32 block + 2 c + pair + 8 s in bits 2s..2s+1."""
    N, K = t.shape
    c = (t.to(torch.int16) + 1).to(torch.uint8).reshape(N // TILE, TILE, K // BLOCK, 4, 4, 2)  # (tile, row, block, s, c, pair)
    c = c.permute(0, 2, 4, 1, 5, 3)  # (tile, block, c, row, pair, s)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).reshape(N, K // 4)


def unpack_ternary_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_ternary_tiles`: (N, K/4) uint8 -> t (N, K) int8."""
    N, J = packed.shape
    b = packed.reshape(N // TILE, J // 8, 4, TILE, 2)  # (tile, block, c, row, pair)
    c = torch.stack([(b >> (2 * s)) & 3 for s in range(4)], dim=-1)  # (..., s)
    return (c.permute(0, 3, 1, 5, 2, 4).view(torch.int8) - 1).reshape(N, 4 * J)


def scales_to_tiles(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, G) group scales -> (N, K/32) fp16, one per 32-block in tile order (tile, block, row)."""
    per_block = scales.to(torch.float16).repeat_interleave(group_size // BLOCK, dim=1)  # (N, K/32)
    N, nb = per_block.shape
    return per_block.reshape(N // TILE, TILE, nb).transpose(1, 2).reshape(N, nb).contiguous()


def tiles_to_scales(tiled: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `scales_to_tiles`: (N, K/32) -> (N, G) fp16."""
    N, nb = tiled.shape
    per_block = tiled.reshape(N // TILE, nb, TILE).transpose(1, 2).reshape(N, nb)
    return per_block[:, :: group_size // BLOCK].contiguous()


def default_ternary_layout(out_features: int, group_size: int) -> str:
    """"tiles" (edgelm's C++ kernel) when it is built and the shape fits it (rows in tiles of 8,
    groups of whole 32-blocks), else "plain" (the torch LUT / decode paths)."""
    fits = out_features % TILE == 0 and group_size % BLOCK == 0
    return "tiles" if fits and kernels.available() else "plain"


class BitLinear(_QuantLinear):
    """Inference linear with packed ternary weights: W = t · s, 2 bits per weight + fp16 scales.

    Runtime buffers in `layout` (not saved as such): `packed` (N, K/4) uint8 and `packed_scales`
    fp16. "tiles" (default where edgelm's kernels run): the C++ tile order and one scale per
    32-block (`pack_ternary_tiles`, `scales_to_tiles`); the int16-activation kernel runs up to
    `min_rows` rows, more rows its C++ dequantize + one GEMM. "plain": `pack_ternary` order and
    (N, G) scales; one row runs `lut_matmul`, more rows `decode_ternary` + one GEMM. The saved
    format is portable whatever the layout: `qweight` (N, K/4) in `pack_ternary` order and `scales`
    (N, G) fp16. Reference: `dequantize()` (unpack, then scale).
    """

    min_rows: ClassVar[dict[str, int]] = {"tiles": 24, "plain": 2}  # the int4 blocks crossover holds here too (same kernel shape)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = TERNARY_GROUP,
                 layout: str | None = None):
        check_ternary_shape(out_features, in_features, group_size)
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = layout or default_ternary_layout(out_features, group_size)
        self.dequant_min_rows = self.min_rows[self.layout]
        cols = in_features // (BLOCK if self.layout == "tiles" else group_size)
        self.register_buffer("packed", torch.zeros(out_features, in_features // 4, dtype=torch.uint8), persistent=False)
        self.register_buffer("packed_scales", torch.zeros(out_features, cols, dtype=torch.float16), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int | None = None) -> BitLinear:
        """Ternarize an nn.Linear (or a trained TernaryLinear, with its own group size)."""
        group_size = group_size or getattr(linear, "group_size", TERNARY_GROUP)
        t, s = ternary_params(linear.weight.detach(), group_size)
        return cls.from_ternary(t, s, group_size, linear.bias)

    @classmethod
    def from_ternary(cls, t: torch.Tensor, scales: torch.Tensor, group_size: int, bias=None,
                     layout: str | None = None) -> BitLinear:
        N, K = t.shape
        m = cls(K, N, bias is not None, group_size, layout)
        m.set_ternary(t, scales)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return m

    @classmethod
    def concat(cls, linears: list[BitLinear]) -> BitLinear | None:
        """One BitLinear whose output rows are the given ones' (the q/k/v or gate/up fusion): the
        tile and plain layouts both concatenate by rows. None for mixed group sizes or layouts."""
        first = linears[0]
        if any(m.group_size != first.group_size or m.layout != first.layout or m.in_features != first.in_features
               for m in linears):
            return None
        N = sum(m.out_features for m in linears)
        fused = cls(first.in_features, N, any(m.bias is not None for m in linears), first.group_size, first.layout)
        fused.packed = torch.cat([m.packed for m in linears])
        fused.packed_scales = torch.cat([m.packed_scales for m in linears])
        if fused.bias is not None:
            biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears]
            fused.bias = nn.Parameter(torch.cat(biases).float(), requires_grad=False)
        return fused

    def set_ternary(self, t: torch.Tensor, scales: torch.Tensor) -> None:
        """Store codes t (N, K) and group scales (N, G) in this module's layout."""
        if self.layout == "tiles":
            self.packed, self.packed_scales = pack_ternary_tiles(t), scales_to_tiles(scales, self.group_size)
        else:
            self.packed, self.packed_scales = pack_ternary(t), scales.to(torch.float16).contiguous()

    def codes(self) -> torch.Tensor:
        """t (N, K) int8 in {-1, 0, 1}."""
        return unpack_ternary_tiles(self.packed) if self.layout == "tiles" else unpack_ternary(self.packed)

    def group_scales(self) -> torch.Tensor:
        """(N, G) fp16."""
        return tiles_to_scales(self.packed_scales, self.group_size) if self.layout == "tiles" else self.packed_scales

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference weight (N, K): unpack, then scale."""
        return ternary_values(self.codes(), self.group_scales(), self.group_size).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """W[rows] (R, K) fp32, reading only those rows ("tiles": the 8-row tiles that hold them)."""
        rows = rows.reshape(-1).long()
        if self.layout == "plain":
            return ternary_values(unpack_ternary(self.packed[rows]), self.packed_scales[rows], self.group_size)
        tiles = rows // TILE
        packed = self.packed.reshape(-1, TILE * self.packed.shape[1])[tiles].reshape(-1, self.packed.shape[1])
        scales = self.packed_scales.reshape(-1, TILE * self.packed_scales.shape[1])[tiles]
        pick = torch.arange(len(rows)) * TILE + rows % TILE  # row r of tile i is row i * 8 + r % 8 here
        t = unpack_ternary_tiles(packed)[pick]
        s = tiles_to_scales(scales.reshape(-1, self.packed_scales.shape[1]), self.group_size)[pick]
        return ternary_values(t, s, self.group_size)

    def kernel_handle(self):
        return self._edgelm_kernel(3, self.packed, self.packed_scales) if self.layout == "tiles" else None

    def torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        y = lut_matmul(x, self.packed, self.packed_scales, self.group_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.layout == "plain":  # one table lookup per byte, ~1.6x the reference
            return decode_ternary(self.packed, self.packed_scales, self.group_size, dtype)
        return super().dense_weight(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        destination[prefix + "qweight"] = pack_ternary(self.codes())
        destination[prefix + "scales"] = self.group_scales()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        qkey, skey = prefix + "qweight", prefix + "scales"
        if qkey in state_dict and skey in state_dict:
            q, s = state_dict[qkey], state_dict[skey]
            G = self.in_features // self.group_size
            if q.shape != (self.out_features, self.in_features // 4) or s.shape != (self.out_features, G):
                errors.append(f"{prefix}: ternary qweight {tuple(q.shape)} / scales {tuple(s.shape)} do not fit "
                              f"({self.out_features}, {self.in_features}) with group size {self.group_size}")
            else:
                self.set_ternary(unpack_ternary(q), s)
        elif strict:
            missing.extend(k for k in (qkey, skey) if k not in state_dict)
        rest = {k: v for k, v in state_dict.items() if k not in (qkey, skey)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}"


# ---- whole models ------------------------------------------------------------------------------


def is_ternary_target(path: str, module: nn.Module) -> bool:
    """The decoder layers' linears (the LM head and the embedding stay out, as in BitCPM)."""
    return ".layers." in f".{path}" and isinstance(module, nn.Linear)


def swap_linears(model: nn.Module, make, predicate=None, group_size: int = TERNARY_GROUP) -> dict[str, nn.Module]:
    """Replace every nn.Linear matching `predicate` (default: decoder layers) by make(linear), after
    checking every shape against `group_size` (a trained TernaryLinear's own group size wins)."""
    from edgelm.quant.quantize import set_module

    predicate = predicate or is_ternary_target
    targets = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear) and predicate(p, m)}
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to ternarize")
    for p, m in targets.items():
        check_ternary_shape(m.out_features, m.in_features, getattr(m, "group_size", group_size))
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
    swap_linears(model, lambda m: BitLinear.from_float(m, group_size), predicate, group_size)
    return finish_ternary(model, group_size, head)


def ternarize_decoder(model: nn.Module, group_size: int = TERNARY_GROUP) -> list[str]:
    """`edgelm quantize --method ternary`: `ternarize_model` over the decoder linears whose shapes
    take it, keeping the others dense (returned, with a note on stderr, as `quantize_decoder` does)."""
    import sys

    skipped = []

    def predicate(path, m) -> bool:
        if not is_ternary_target(path, m):
            return False
        try:
            check_ternary_shape(m.out_features, m.in_features, group_size)
        except ValueError:
            skipped.append(path)
            return False
        return True

    ternarize_model(model, group_size, predicate)
    if skipped:
        print(f"note: {len(skipped)} layers kept dense (in_features not a multiple of group {group_size}): {skipped[:4]}",
              file=sys.stderr)
    return skipped

