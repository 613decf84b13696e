"""edgelm vs its speed peers on the same GGUF, same threads, one process, alternating runs.

    python benchmarks/peers.py [--model PATH.gguf] [--engines native:gguf,native:fp32,llama.cpp,transformers]
                               [--prompt-tokens 512] [--gen-tokens 256] [--repeat 3] [--threads 2]

Each engine runs through the executor interface (edgelm.backends); medians over --repeat runs.
The measured read bandwidth and each engine's weight bytes give the decode roofline fraction.
"""

import argparse
import json
import statistics

from edgelm.config import configure_runtime, set_threads
from edgelm.hub import default_model_path
from edgelm.profiler.bench import measure_bandwidth_gbs
from edgelm.profiler.profile import make_executor, prompt_ids, time_prompt


def engine(spec: str, path: str, threads: int):
    backend, _, quant = spec.partition(":")
    return make_executor(backend, path, quant or "fp32", threads)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--engines", default="native:gguf,native:fp32,llama.cpp,transformers")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    set_threads(args.threads)
    configure_runtime()
    path = str(args.model or default_model_path())
    engines = {spec: engine(spec, path, args.threads) for spec in args.engines.split(",")}
    ids = prompt_ids(next(iter(engines.values())).tokenizer, args.prompt_tokens)
    runs = {spec: [] for spec in engines}
    for _ in range(args.repeat):
        for spec, ex in engines.items():
            runs[spec].append(time_prompt(ex, ids, args.gen_tokens))
    bandwidth = measure_bandwidth_gbs()
    rows = {}
    for spec, rs in runs.items():
        decode_ms = statistics.median(r["decode_ms_per_token"] for r in rs)
        wbytes = engines[spec].weight_bytes()
        rows[spec] = {
            "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in rs), 1),
            "decode_tok_s": round(1e3 / decode_ms, 1),
            "weight_bytes": wbytes,
            "roofline_fraction": round((1e3 / decode_ms) / (bandwidth * 1e9 / wbytes), 3),
        }
    print(json.dumps({"model": path, "bandwidth_gb_s": round(bandwidth, 1), **vars(args), "results": rows}, indent=2))
    print(f"\n| engine | prefill {args.prompt_tokens} tok/s | decode tok/s | weight MB | roofline |")
    print("|---|---|---|---|---|")
    for spec, r in rows.items():
        print(f"| {spec} | {r['prefill_tok_s']} | {r['decode_tok_s']} | {r['weight_bytes'] / 1e6:.0f} "
              f"| {r['roofline_fraction']:.0%} |")


if __name__ == "__main__":
    main()
