"""The CPM.cu combination at long context: int4 weights + InfLLM v2 sparse attention + speculative
decoding, against plain fp32 dense decoding, in one run (issues #6 and #7).

    python benchmarks/composition.py [--context 16384] [--gen-tokens 32] [--threads 2]

The prompt is --context tokens of the Python library docs (real text, so prompt lookup finds
repeats as it would on a long document); the model is SmolLM2-135M (real weights; its trained
context is 8K, RoPE runs on beyond it: the speed is what is measured here, the text past 8K is not
meaningful). Each row prefills the same prompt, then decodes --gen-tokens greedy tokens; every
speculative row is checked token for token against the plain row with the same weights and
attention. Sparse settings: MiniCPM4's defaults with lengths scaled by SmolLM2's 8K / MiniCPM4's
32K (block 64, kernel 32/16, init 1, window 512, topk 16, dense_len 2048), as in
benchmarks/sparse_attention.py.
"""

import argparse
import time
from pathlib import Path

import torch

from edgelm import load
from edgelm.config import configure_runtime, set_threads
from edgelm.generate import generate_step
from edgelm.layers.sparse_attention import SparseConfig
from edgelm.speculative import NgramProposer, speculative_generate_step

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = SHARED / "data" / "python-library-docs.txt"
SPARSE = SparseConfig(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=512, topk=16, dense_len=2048)


def run(model, prompt: list[int], gen_tokens: int, speculative: bool) -> dict:
    t0 = time.perf_counter()
    if speculative:
        steps = speculative_generate_step(model, prompt, NgramProposer(n_max=5, n_min=2), num_draft=4, max_tokens=gen_tokens)
    else:
        steps = generate_step(model, prompt, max_tokens=gen_tokens)
    tokens, first = [], None
    for token, _ in steps:
        if first is None:
            first = time.perf_counter()
        tokens.append(token)
    end = time.perf_counter()
    decode_s = end - first
    return {
        "prefill_s": first - t0,
        "decode_tok_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 else float("nan"),
        "tokens": tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    configure_runtime()
    set_threads(args.threads)
    fp32 = load(args.model, dequantize=True)
    int4 = load(args.model, quantize="int4", group_size=32)
    for m in (fp32, int4):
        m.config.max_position_embeddings = max(m.config.max_position_embeddings, args.context + args.gen_tokens + 8)
    text = TEXT.read_text(errors="ignore")[-8_000_000:]
    prompt = fp32.tokenizer.encode(text)[: args.context]
    rows = [
        ("fp32, dense attention, plain decoding", fp32, None, False),
        ("int4, dense attention, plain decoding", int4, None, False),
        ("int4, sparse attention, plain decoding", int4, SPARSE, False),
        ("int4, sparse attention, n-gram speculation", int4, SPARSE, True),
    ]
    results, reference = [], {}
    for name, model, sparse, spec in rows:
        model.set_sparse_attention(sparse)
        r = run(model, prompt, args.gen_tokens, spec)
        key = (id(model), sparse is not None)
        same = "-" if not spec else ("yes" if r["tokens"] == reference.get(key) else "NO")
        reference.setdefault(key, r["tokens"])
        results.append((name, r, same))
        print(f"{name}: prefill {r['prefill_s']:.1f} s, decode {r['decode_tok_s']:.2f} tok/s", flush=True)
    base = results[0][1]["decode_tok_s"]
    print(f"\nSmolLM2-135M, {len(prompt)}-token prompt, {args.gen_tokens} greedy tokens, {args.threads} threads\n")
    print("| configuration | prefill s | decode tok/s | vs fp32 dense | = plain greedy |")
    print("|---|---:|---:|---:|---|")
    for name, r, same in results:
        print(f"| {name} | {r['prefill_s']:.1f} | {r['decode_tok_s']:.2f} | {r['decode_tok_s'] / base:.2f}x | {same} |")


if __name__ == "__main__":
    main()
