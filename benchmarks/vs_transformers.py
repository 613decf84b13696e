"""edgelm vs transformers on the same GGUF, same prompt, same threads: prefill and decode speed.

    python benchmarks/vs_transformers.py [--model PATH.gguf] [--prompt-tokens 512] [--gen-tokens 256]

Runs each engine `--repeat` times alternately in one process and prints medians (JSON + table).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from edgelm import load
from edgelm.config import configure_runtime, set_threads
from edgelm.generate import generate_step
from edgelm.hub import default_model_path


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = (Path(__file__).resolve().parents[2] / "shared/data/python-library-docs.txt").read_text()[:200_000]
    return tokenizer.encode(text)[:n]


def time_edgelm(model, ids: list[int], gen: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    steps = generate_step(model, ids, max_tokens=gen)
    next(steps)
    t1 = time.perf_counter()
    for _ in steps:
        pass
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (gen - 1) / (t2 - t1)


@torch.inference_mode()
def time_transformers(model, ids: list[int], gen: int) -> tuple[float, float]:
    from transformers import DynamicCache

    cache = DynamicCache()
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    out = model(x, past_key_values=cache, use_cache=True, logits_to_keep=1)  # as generate() does
    tok = out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (gen - 1) / (t2 - t1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    set_threads(args.threads)
    configure_runtime()
    path = Path(args.model) if args.model else default_model_path()
    engines = {
        "edgelm fp32": (load(path, dtype=torch.float32), time_edgelm),
        "edgelm bf16": (load(path, dtype=torch.bfloat16), time_edgelm),
    }
    for dtype in (torch.float32, torch.bfloat16):
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
        engines[f"transformers {str(dtype)[6:]}"] = (ref, time_transformers)
    ids = prompt_ids(engines["edgelm fp32"][0].tokenizer, args.prompt_tokens)
    results = {name: [] for name in engines}
    for _ in range(args.repeat):
        for name, (model, fn) in engines.items():
            results[name].append(fn(model, ids, args.gen_tokens))
    summary = {
        name: {
            "prefill_tok_s": round(statistics.median(r[0] for r in runs), 1),
            "decode_tok_s": round(statistics.median(r[1] for r in runs), 1),
        }
        for name, runs in results.items()
    }
    print(json.dumps({"model": str(path), "threads": args.threads, **vars(args), "results": summary}, indent=2))
    print(f"\n| engine | prefill {args.prompt_tokens} tok/s | decode tok/s |\n|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['prefill_tok_s']} | {s['decode_tok_s']} |")


if __name__ == "__main__":
    main()
