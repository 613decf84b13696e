"""Packed ternary matmul vs fp32 and int4, side by side in one run (medians, ms per call),
SmolLM2-135M shapes plus its 49152 x 576 head shape.

    python benchmarks/ternary_matmul.py [--threads 1] [--rows 1,4,16]

Columns: fp32 (edgelm's few-rows kernel, what a dense decode runs); int4 g32 and int8 (edgelm's
tile kernels); ternary C++ (`BitLinear`, "tiles" layout: the q2_tiles kernel); LUT (`lut_matmul`,
the pure-torch packed path that runs without the C++ kernels); reference (unpack_ternary, scale,
F.linear). Ratios are against fp32 in the same run.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from edgelm import kernels
from edgelm.quant.linear import Int4Linear, Int8Linear
from edgelm.quant.ternary import BitLinear, lut_matmul, ternary_values, unpack_ternary

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (N out, K in): q/o, gate/up, down, head


def median_ms(f, repeat: int = 7, budget_s: float = 0.05) -> float:
    f()
    t0 = time.perf_counter()
    f()
    inner = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-6)))
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        runs.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(runs)


@torch.inference_mode()
def time_row(x, fp, q8, q4, tern, plain, no_lut: bool) -> tuple[float, ...]:
    ext = kernels.ext()
    times = [median_ms(lambda h=h: ext.linear(h, x)) for h in (fp, q8.kernel_handle(), q4.kernel_handle(), tern.kernel_handle())]
    if no_lut:
        return (*times, float("nan"), float("nan"))
    lut = median_ms(lambda: lut_matmul(x, plain.packed, plain.packed_scales, 32), repeat=3)
    ref = median_ms(lambda: F.linear(x, ternary_values(unpack_ternary(plain.packed), plain.packed_scales, 32)), repeat=3)
    return (*times, lut, ref)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--no-lut", action="store_true", help="skip the slow pure-torch columns")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("edgelm's C++ kernels are not built: nothing to compare")
    print(f"{args.threads} thread(s), ms per call (medians of 7)\n")
    print("| N x K | rows | fp32 | int8 | int4 g32 | ternary C++ | LUT (torch) | reference | ternary / fp32 | ternary / int4 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for N, K in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False)
        tern = BitLinear.from_float(lin, 32)
        plain = BitLinear.from_ternary(tern.codes(), tern.group_scales(), 32, layout="plain")
        q4, q8 = Int4Linear.from_float(lin, 32), Int8Linear.from_float(lin)
        fp = kernels.dense_handle(lin)
        for M in (int(r) for r in args.rows.split(",")):
            t_fp, t8, t4, t2, lut, ref = time_row(torch.randn(M, K), fp, q8, q4, tern, plain, args.no_lut)
            print(f"| {N} x {K} | {M} | {t_fp:.3f} | {t8:.3f} | {t4:.3f} | {t2:.3f} | {lut:.2f} | {ref:.2f} "
                  f"| {t2 / t_fp:.2f}x | {t2 / t4:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
