"""Short prompts through the one-call C++ step vs the module path, side by side in one process.

    python benchmarks/short_prefill.py [--lengths 17,40,64,128] [--threads 2] [--repeat 7]

SmolLM2-135M (the GGUF's int4 layers as loaded, and dequantized to fp32): median ms of one prefill
forward (fresh cache, last position's logits) with the fast step allowed (`MAX_ROWS`, default)
and forbidden (`MAX_ROWS = 0`: the module path, F.linear / dequantize + GEMM), alternating.
A chat turn's prompt is tens of tokens, so this is most of a server's time to first token.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from edgelm.kernels import llama as fast
from edgelm.loader import load

MODEL = Path(__file__).resolve().parents[2] / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


@torch.inference_mode()
def prefill_ms(model, ids: list[int], max_rows: int) -> float:
    fast.MAX_ROWS = max_rows
    t = time.perf_counter()
    model(torch.tensor([ids]), model.make_cache(), num_logits=1)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--lengths", default="17,40,64,128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    default = fast.MAX_ROWS
    text = (Path(__file__).resolve().parents[2] / "shared/data/python-library-docs.txt").read_text()[:20000]
    print(f"| weights | prompt tokens | module path ms | one call ms | speed-up |\n|---|---:|---:|---:|---:|")
    for name, dequantize in (("GGUF int4", False), ("fp32", True)):
        model = load(args.model, dtype=torch.float32, dequantize=dequantize)
        tokens = model.tokenizer.encode(text)
        for n in (int(v) for v in args.lengths.split(",")):
            ids = tokens[:n]
            prefill_ms(model, ids, default), prefill_ms(model, ids, 0)  # warm-up
            slow, quick = [], []
            for _ in range(args.repeat):
                slow.append(prefill_ms(model, ids, 0))
                quick.append(prefill_ms(model, ids, default))
            a, b = statistics.median(slow), statistics.median(quick)
            print(f"| {name} | {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)
    fast.MAX_ROWS = default


if __name__ == "__main__":
    main()
