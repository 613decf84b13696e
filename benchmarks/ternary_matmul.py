"""Packed ternary matmul vs fp32, side by side in one run (medians, 1 thread), SmolLM2-135M shapes.

    python benchmarks/ternary_matmul.py

Columns (ms per call): fp32 F.linear on the dense weight; `lut_matmul` (the packed LUT kernel);
decode + GEMM (`decode_ternary` then F.linear, BitLinear's path for >= 2 rows); reference
(unpack_ternary, scale, F.linear).
"""

import statistics
import time

import torch
import torch.nn.functional as F

from edgelm.quant.ternary import BitLinear, decode_ternary, lut_matmul, ternary_values, unpack_ternary

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (N out, K in): q/o, gate/up, down


def median_ms(f, repeat: int = 7, inner: int = 10) -> float:
    f()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        runs.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(runs)


def main() -> None:
    torch.set_num_threads(1)
    print("| N x K | rows | fp32 | LUT packed | decode + GEMM | reference | LUT / fp32 |")
    print("|---|---|---|---|---|---|---|")
    for N, K in SHAPES:
        b = BitLinear.from_float(torch.nn.Linear(K, N, bias=False))
        w = b.dequantize()
        for M in (1, 16):
            x = torch.randn(M, K)
            fp = median_ms(lambda: F.linear(x, w))
            lut = median_ms(lambda: lut_matmul(x, b.qweight, b.scales, 32))
            dec = median_ms(lambda: F.linear(x, decode_ternary(b.qweight, b.scales, 32)))
            ref = median_ms(lambda: F.linear(x, ternary_values(unpack_ternary(b.qweight), b.scales, 32)))
            print(f"| {N} x {K} | {M} | {fp:.3f} | {lut:.3f} | {dec:.3f} | {ref:.3f} | {lut / fp:.1f}x |")


if __name__ == "__main__":
    main()
