"""Quantize / dequantize / pack helpers shared by the runtime modules and the offline tools (GPTQ).

Conventions (those of PyTorch's CPU weight-only kernels, checked in tests/test_quant.py):

int4, group-wise, for `torch._weight_int4pack_mm_for_cpu`:
    W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g],   g = k // group_size,  q in 0..15
    Symmetric groups are the special case zero == 0. The kernel reads scale and zero from one bf16
    tensor `scales_and_zeros` (K / group_size, N, 2), in the activation dtype: bf16 activations
    are the only fast CPU path (fp32 and fp16 activations are ~13x slower), so scales are bf16.
int8, per output channel, symmetric, for `torch._weight_int8pack_mm`:
    W[n, k] = q[n, k] * scale[n],   q in -127..127,  scale bf16 (N,)

Shapes: N = out_features (rows), K = in_features (columns), G = K / group_size.
"""

import functools

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel accepts
INT4_ROW_MULTIPLE = 16  # the CPU packing works on blocks of 16 rows
INT8_COL_MULTIPLE = 8  # the CPU int8 kernel silently returns wrong sums (or crashes) otherwise
SCALE_DTYPE = torch.bfloat16
SUPPORTED_BITS = (4, 8)


def check_int4_shape(out_features: int, in_features: int, group_size: int) -> None:
    """ValueError naming the layer shape when the int4 CPU kernel cannot hold it."""
    shape = f"({out_features}, {in_features})"
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size} (weight {shape})"
        )
    if in_features % group_size:
        raise ValueError(
            f"int4 group_size {group_size} does not divide in_features {in_features} (weight {shape}); "
            "pick a group size that divides it or leave this layer out with a predicate"
        )
    if out_features % INT4_ROW_MULTIPLE:
        raise ValueError(
            f"int4 needs out_features divisible by {INT4_ROW_MULTIPLE}, got {out_features} (weight {shape}); "
            "leave this layer out with a predicate"
        )


def check_int8_shape(out_features: int, in_features: int) -> None:
    if in_features % INT8_COL_MULTIPLE:
        raise ValueError(
            f"int8 needs in_features divisible by {INT8_COL_MULTIPLE}, got {in_features} "
            f"(weight ({out_features}, {in_features})); leave this layer out with a predicate"
        )


def check_bits(bits: int, out_features: int, in_features: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{bits}-bit weights are not supported (weight ({out_features}, {in_features})); "
            f"use one of {SUPPORTED_BITS}"
        )


# ---- int4 ---------------------------------------------------------------------------------------


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = w.shape
    return w.float().reshape(N, K // group_size, group_size)  # (N, G, group)


def quantize_int4(
    w: torch.Tensor, group_size: int = 32, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q uint8 (N, K) in 0..15, scales bf16 (N, G), zeros bf16 (N, G)).

    Asymmetric: the group's [min, max] spans the 16 levels. Symmetric (llama.cpp Q4_0's rule):
    scale = -(signed value of largest magnitude) / 8, so that value lands exactly on level -8 and
    the opposite side gets -7..7. The codes are rounded against the bf16-rounded scales the kernel
    will use, so the stored scales are the ones the codes were chosen for.
    """
    check_int4_shape(*w.shape, group_size)
    g = _groups(w, group_size)
    scale, zero = int4_group_params(g, symmetric)
    q = int4_codes(g, scale[..., None], zero[..., None])
    return q.reshape(w.shape), scale, zero


def int4_group_params(g: torch.Tensor, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """g (..., group) fp32 -> (scale, zero) bf16 (...): the int4 grid of each group (no shape
    checks: GPTQ also uses it on groups the CPU kernel cannot hold)."""
    if symmetric:
        idx = g.abs().argmax(-1, keepdim=True)
        scale = (g.gather(-1, idx) / -8).squeeze(-1)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / 15
        zero = lo + 8 * scale
    return scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round w to its grid: codes uint8 0..15 (scale and zero broadcast against w)."""
    s, z = scale.float(), zero.float()
    safe = torch.where(s == 0, torch.ones_like(s), s)  # constant groups: q = 8 (the zero point)
    return torch.round((w.float() - z) / safe + 8).clamp(0, 15).to(torch.uint8)


def int4_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - 8) * scale + zero in fp32, the same two roundings as `dequantize_int4` and the kernel."""
    return (q.to(torch.float32) - 8) * scale.float() + zero.float()


def dequantize_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype=torch.float32
) -> torch.Tensor:
    """(q uint8 (N, K), scales (N, G), zeros (N, G)) -> W (N, K) in `dtype` (computed in fp32)."""
    N, K = q.shape
    centered = q.to(torch.uint8).view(torch.int8) - 8  # an int8 pass: 4x less traffic than fp32
    # (N, G, group) fp32; (q - 8) * scale is exact in fp32 (4 x 8 significant bits), so the only
    # rounding is the + zero, as in the kernel
    w = centered.reshape(N, K // group_size, group_size).to(torch.float32)
    w.mul_(scales.float()[..., None]).add_(zeros.float()[..., None])  # in place; addcmul is 4x slower
    return w.reshape(N, K).to(dtype)


def merge_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """scales, zeros (N, G) -> the kernel's (G, N, 2) bf16 tensor."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(SCALE_DTYPE)


def split_scales_and_zeros(scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N, 2) -> scales, zeros (N, G)."""
    sz = scales_and_zeros.transpose(0, 1)
    return sz[..., 0], sz[..., 1]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Portable nibble packing: q (N, K) 0..15 -> (N, K/2) uint8, byte j = q[2j] | q[2j+1] << 4."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K/2) uint8 -> (N, K) uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# edgelm's own kernel layout (edgelm/kernels/cpu.cpp, whose header has the byte-level picture).
# Rows come in tiles of TILE = 8: for each 32-weight block, the tile's 8 rows are interleaved so that
# one 16-byte load widens to two int16 vectors holding a k-pair of every row per 32-bit lane (the
# kernel then needs no horizontal sums). Scales follow the same tiles: per (tile, block) the 8 rows'
# scales, then their zeros. int4 rows always fill whole tiles (check_int4_shape: N % 16 == 0);
# int8 (`pack_int8_tiles`) keeps its N % 8 tail rows row-major.
BLOCK = 32
TILE = 8


def _tiled(n: int) -> int:
    return n // TILE * TILE


def pack_int4_blocks(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) 0..15 -> (N, K/2) uint8 in the kernels' block layout (N % 8 == 0, K % 32 == 0)."""
    N, K = q.shape
    # (tile, row, block, half, c, pair) with k = 32 block + 16 half + 2 c + pair
    # -> bytes ordered (tile, block, c, row, pair), the half-16 codes in the high nibble
    t = q.to(torch.uint8).reshape(N // TILE, TILE, K // BLOCK, 2, 8, 2).permute(0, 2, 4, 1, 5, 3)
    return (t[..., 0] | (t[..., 1] << 4)).reshape(N, K // 2)


def unpack_int4_blocks(packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `pack_int4_blocks`: (N, K/2) uint8 -> (N, K) uint8 codes, or only `rows` (R,)
    of them (reading just the tiles that hold them: embedding lookups)."""
    N, half = packed.shape
    if rows is not None:
        rows = rows.reshape(-1).long()
        tiles = packed.reshape(N // TILE, TILE * half)[rows // TILE].reshape(-1, half)
        return unpack_int4_blocks(tiles)[torch.arange(len(rows)) * TILE + rows % TILE]
    t = packed.reshape(N // TILE, half // 16, 8, TILE, 2)  # (tile, block, c, row, pair)
    t = torch.stack([t & 15, t >> 4], dim=-1)  # (..., half)
    return t.permute(0, 3, 1, 5, 2, 4).reshape(N, half * 2)


def expand_to_blocks(scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """scales, zeros (N, G) -> (N, K/32, 2) bf16 in the kernels' tiled order: one (scale, zero)
    per 32-block whatever the group size (the kernel reads one block's scales with one load)."""
    sz = torch.stack([scales, zeros], dim=-1).to(SCALE_DTYPE)  # (N, G, 2)
    sz = sz.repeat_interleave(group_size // BLOCK, dim=1)  # (N, nb, 2)
    N, nb, _ = sz.shape
    return sz.reshape(N // TILE, TILE, nb, 2).permute(0, 2, 3, 1).reshape(N, nb, 2).contiguous()  # (tile, block, s/z, row)


def blocks_to_groups(block_sz: torch.Tensor, group_size: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `expand_to_blocks`: (N, K/32, 2) -> scales, zeros (N, G), or only `rows`."""
    N, nb, _ = block_sz.shape
    tiles = block_sz.reshape(N // TILE, nb, 2, TILE)  # (tile, block, s/z, row)
    if rows is None:
        sz = tiles.permute(0, 3, 1, 2).reshape(N, nb, 2)
    else:
        rows = rows.reshape(-1).long()
        sz = tiles[rows // TILE, :, :, rows % TILE]  # (R, nb, 2)
    sz = sz[:, :: group_size // BLOCK]
    return sz[..., 0], sz[..., 1]


def pack_int8_tiles(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) -> the kernels' tiled order, same shape: per 8-row tile and 32-column
    block, sixteen 16-byte chunks c with byte i = q[8t + i/2, 32b + 2c + i%2]; tail rows as they are."""
    N, K = q.shape
    T = _tiled(N)
    t = q[:T].reshape(T // TILE, TILE, K // BLOCK, 16, 2).permute(0, 2, 3, 1, 4)  # (tile, block, c, row, pair)
    return torch.cat([t.reshape(T, K), q[T:]]).contiguous()


def unpack_int8_tiles(packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `pack_int8_tiles`, or only `rows` (R,) of it (reading just their tiles)."""
    N, K = packed.shape
    T = _tiled(N)

    def untile(x):  # whole tiles (n, K) -> rows
        return x.reshape(-1, K // BLOCK, 16, TILE, 2).permute(0, 3, 1, 2, 4).reshape(-1, K)

    if rows is None:
        return torch.cat([untile(packed[:T]), packed[T:]])
    rows = rows.reshape(-1).long()
    in_tile = rows < T
    out = torch.empty(len(rows), K, dtype=packed.dtype)
    r = rows[in_tile]
    tiles = untile(packed[:T].reshape(T // TILE, TILE * K)[r // TILE])  # (R' * 8, K)
    out[in_tile] = tiles[torch.arange(len(r)) * TILE + r % TILE]
    out[~in_tile] = packed[rows[~in_tile]]
    return out


# torch's CPU layout packs each block of BLOCK_N rows on its own (BLOCK_N = 32 with AVX2, 64 with
# AVX-512) into a contiguous run of BLOCK_N * K / 2 bytes, nibble order depending on the ISA. We
# only rely on "blocks of 64 rows are independent and in order", which holds for every BLOCK_N that
# divides 64, and learn the order inside a block by packing probes (see `_nibble_positions`).
PACK_ROWS = 64
PACK_CHUNK_ROWS = 4096  # rows converted at a time: bounds the int32 staging copy to 16 KiB * K


def pack_int4_for_cpu(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) uint8 0..15 -> torch's CPU int4pack layout (N, K/2) uint8 (ISA-specific: not for
    files). Converted in row chunks so the int32 copy the converter wants stays small."""
    chunks = [
        torch._convert_weight_to_int4pack_for_cpu(q[i : i + PACK_CHUNK_ROWS].to(torch.int32), 1)
        for i in range(0, q.shape[0], PACK_CHUNK_ROWS)
    ]
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


@functools.lru_cache(maxsize=64)
def _nibble_positions(rows: int, K: int) -> torch.Tensor:
    """(rows, K) int64: where element (n, k) of a `rows`-row matrix lands in the CPU-packed nibble
    stream (byte i holds nibbles 2i (low) and 2i+1 (high)). Found by packing the index's hex
    digits: each digit plane packs like any int4 matrix, and reading the planes back spells out the
    source index of every packed nibble."""
    n = rows * K
    index = torch.arange(n, dtype=torch.int64)
    source = torch.zeros(n, dtype=torch.int64)
    for shift in range(0, max(n - 1, 1).bit_length(), 4):
        digits = ((index >> shift) & 15).reshape(rows, K).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(digits, 1).reshape(-1)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
        source |= nibbles.to(torch.int64) << shift
    assert torch.equal(torch.sort(source).values, index), "CPU int4 packing is not a permutation"
    positions = torch.empty(n, dtype=torch.int64)
    positions[source] = index
    return positions.reshape(rows, K)


@functools.lru_cache(maxsize=64)
def _split_positions(rows: int, K: int) -> torch.Tensor:
    """(1, rows * K): `_nibble_positions` re-expressed as indices into one block's nibbles split as
    [all low nibbles | all high nibbles], which two contiguous (vectorized) ops produce."""
    pos = _nibble_positions(rows, K).reshape(1, -1)
    return (pos % 2) * (rows * K // 2) + pos // 2


def _unpack_blocks(packed: torch.Tensor, rows: int, out: torch.Tensor) -> None:
    """packed (B * rows, K/2), blocks of `rows` rows packed on their own -> codes into out (B * rows, K)."""
    half = packed.shape[1] * rows  # bytes per block
    blocks = packed.reshape(-1, half)  # (B, bytes)
    split = torch.empty(blocks.shape[0], 2 * half, dtype=torch.uint8)  # (B, [low | high])
    torch.bitwise_and(blocks, 15, out=split[:, :half])
    torch.bitwise_right_shift(blocks, 4, out=split[:, half:])
    index = _split_positions(rows, 2 * packed.shape[1]).expand(blocks.shape[0], -1)
    torch.gather(split, 1, index, out=out.reshape(blocks.shape[0], -1))


def unpack_int4_from_cpu(packed: torch.Tensor) -> torch.Tensor:
    """Read all codes back from torch's CPU layout: packed (N, K/2) -> q (N, K) uint8.
    One gather per 64-row block with a shared index (~2 ns per weight)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    full = N // PACK_ROWS * PACK_ROWS
    out = torch.empty(N, K, dtype=torch.uint8)
    if full:
        _unpack_blocks(packed[:full], PACK_ROWS, out[:full])
    if full < N:  # the last, shorter block of N % 64 rows is packed on its own
        _unpack_blocks(packed[full:], N - full, out[full:])
    return out


def unpack_int4_rows_from_cpu(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Codes of a few rows (an embedding lookup): rows (R,) int64 -> q (R, K) uint8, reading only
    the bytes those rows occupy."""
    N, K = packed.shape[0], packed.shape[1] * 2
    full = N // PACK_ROWS * PACK_ROWS
    pos = torch.empty(rows.numel(), K, dtype=torch.int64)  # nibble positions, (R, K)
    in_full = rows < full
    rf, rt = rows[in_full], rows[~in_full]
    pos[in_full] = _nibble_positions(PACK_ROWS, K)[rf % PACK_ROWS] + (rf - rf % PACK_ROWS)[:, None] * K
    if len(rt):
        pos[~in_full] = _nibble_positions(N - full, K)[rt - full] + full * K
    byte = packed.reshape(-1)[pos // 2]
    return (byte >> ((pos % 2) * 4).to(torch.uint8)) & 15


# ---- int8 ---------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q int8 (N, K), scale bf16 (N,)), symmetric per output channel.
    Codes are rounded against the bf16-rounded scale s, so |W - q * s| <= s / 2 everywhere: even
    when bf16 rounded s down, max|row| / s <= 127 * (1 + 2^-8) < 127.5 and the clamp stays within
    half a step."""
    check_int8_shape(*w.shape)
    w = w.float()
    scale = int8_row_scale(w)
    return int8_codes(w, scale[:, None]), scale


def int8_row_scale(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) -> symmetric per-row scale bf16 (N,)."""
    return (w.float().abs().amax(-1) / 127).to(SCALE_DTYPE)


def int8_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round w to the int8 grid of `scale` (broadcast against w): codes int8 -127..127."""
    s = scale.float()
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(w.float() / safe).clamp(-127, 127).to(torch.int8)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(q int8 (N, K), scale (N,)) -> W (N, K) in `dtype` (computed in fp32)."""
    return q.to(torch.float32).mul_(scale.float()[:, None]).to(dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 32, symmetric: bool = False) -> tuple:
    """One entry point for offline tools: 4 -> `quantize_int4`, 8 -> `quantize_int8`."""
    check_bits(bits, *w.shape)
    return quantize_int4(w, group_size, symmetric) if bits == 4 else quantize_int8(w)
