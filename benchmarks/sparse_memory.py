"""Memory of long-context prefill, dense vs InfLLM v2 sparse attention (SmolLM2-135M, 30 layers).

    python benchmarks/sparse_memory.py [--length 16384] [--threads 2]

Each mode runs in a fresh process. Both fill positions [0, L - 512) with the sparse executor (fast;
dense attention there would take minutes), the dense mode into plain KVCaches, the sparse mode into
SparseKVCaches (which also hold the pooled key kernels); then the process's peak RSS is reset
(`/proc/self/clear_refs`) and the last 512-token chunk runs in the measured mode. Reported: the
caches' bytes and the peak RSS increase during that chunk (attention intermediates): their sum is
what a long prompt needs on top of the weights.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


@torch.inference_mode()
def measure(mode: str, length: int) -> None:
    import sparse_attention as bench

    from edgelm.cache import KVCache
    from edgelm.generate import prefill

    model = bench.load_model(None, False)
    ids = torch.tensor([bench.text_tokens(model, length)])
    model.set_sparse_attention(bench.SPEED_SPARSE)
    cache = model.make_cache() if mode == "sparse" else [KVCache() for _ in model.layers]
    prefill(model, ids[:, :-512], cache)
    attn = model.layers[0].self_attn
    for c in cache:  # room for the last chunk now, so no buffer grows inside the measurement
        c.reserve(1, attn.num_kv_heads, attn.head_dim, length, torch.empty(0))
    model.set_sparse_attention(bench.SPEED_SPARSE if mode == "sparse" else None)
    cache_mb = sum(c.nbytes for c in cache) / 2**20
    before = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t = time.perf_counter()
    model(ids[:, -512:], cache, num_logits=1)
    seconds = time.perf_counter() - t
    cache_mb = max(cache_mb, sum(c.nbytes for c in cache) / 2**20)
    print(f"{mode} {cache_mb:.1f} {rss_mb('VmHWM') - before:.1f} {seconds:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["dense", "sparse"], help=argparse.SUPPRESS)  # one measuring child
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode:
        return measure(args.mode, args.length)
    rows = {}
    for mode in ("dense", "sparse"):
        cmd = [sys.executable, __file__, "--mode", mode, "--length", str(args.length), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
        rows[mode] = [float(x) for x in out[-3:]]
    print(f"SmolLM2-135M, 30 layers, last 512-token chunk of a {args.length}-token prompt, {args.threads} threads\n")
    print("| mode | caches MB | peak RSS increase in the chunk MB | caches + increase MB | chunk s |")
    print("|---|---:|---:|---:|---:|")
    for mode, (cache, peak, secs) in rows.items():
        print(f"| {mode} | {cache:.1f} | {peak:.1f} | {cache + peak:.1f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
