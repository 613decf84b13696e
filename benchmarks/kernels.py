"""edgelm's int4/int8/fp32 kernels against torch's stock ones and fp32 F.linear (MKL), side by side.

    python benchmarks/kernels.py [--threads 1] [--rows 1,4,8,16]

Prints the median ms per call of each kernel on SmolLM2-135M's shapes (fused qkv, gate/up, down,
the 49K-row LM head) and a 1B-model shape, and the GB/s of weights read.
"""

import argparse
import statistics
import time

import torch

from edgelm import kernels
from edgelm.quant.linear import Int4Linear, Int8Linear

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576), (8192, 2048)]


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,4,8,11,16")
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("edgelm's kernels did not build here (see the warning above)")
    print(f"threads {args.threads}; ms per call (GB/s of weights read)")
    print("shape        M  int4 edgelm     int4 torch   int8 edgelm     int8 torch   fp32 edgelm    fp32 F.linear")
    for N, K in SHAPES:
        linear = torch.nn.Linear(K, N, bias=False).requires_grad_(False)
        ours4 = Int4Linear.from_float(linear, 32)
        torch4 = Int4Linear.from_quantized(ours4.codes(), *ours4.scales_zeros(), 32, None, "torch")
        int8 = Int8Linear.from_float(linear)
        int8_rows = int8.codes()  # row order, as torch's kernel takes it
        w = linear.weight
        f32 = kernels.ext().make_linear(0, w, torch.empty(0), None)  # the few-rows kernel (<= 64 rows)
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K)
            xb = x.bfloat16()
            t = [
                median_ms(lambda: ours4.kernel(x), args.repeat),
                median_ms(lambda: torch4.kernel(x), args.repeat),
                median_ms(lambda: int8.kernel(x), args.repeat),
                median_ms(lambda: torch._weight_int8pack_mm(xb, int8_rows, int8.scales), args.repeat),
                median_ms(lambda: kernels.ext().linear(f32, x), args.repeat),
                median_ms(lambda: x @ w.T, args.repeat),
            ]
            gb = [N * K * 0.5625 / 1e6, N * K * 0.5625 / 1e6, N * K / 1e6, N * K / 1e6, N * K * 4 / 1e6, N * K * 4 / 1e6]
            cells = "  ".join(f"{ms:6.3f} ({g / ms:4.1f})" for ms, g in zip(t, gb))
            print(f"{N:5d}x{K:<5d} {M:2d}  {cells}")


if __name__ == "__main__":
    main()
