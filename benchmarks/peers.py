"""edgelm vs its speed peers on the same GGUF, same threads, one process, alternating runs.

    python benchmarks/peers.py [--model PATH.gguf] [--engines native:gguf,native:fp32,llama.cpp,transformers]
                               [--prompt-tokens 512] [--gen-tokens 256] [--repeat 3] [--threads 2]

Each engine runs through the executor interface (edgelm.backends); medians over --repeat runs.
The measured read bandwidth and each engine's weight bytes give the decode roofline fraction.

`ortgenai:DIR` runs an ONNX Runtime GenAI model folder (pip install 'edgelm[peers]'). Build one from
the same GGUF:
    edgelm convert --model X.gguf --to hf --out HF
    python -m onnxruntime_genai.models.builder -i HF -o DIR -p int4 -e cpu
It gets the same prompt ids (Generator.append_tokens) and intra_op_num_threads = --threads.
"""

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from edgelm.config import configure_runtime, set_threads
from edgelm.hub import default_model_path
from edgelm.profiler.bench import measure_bandwidth_gbs
from edgelm.profiler.profile import make_executor, prompt_ids, time_prompt


class OrtGenAIExecutor:
    """ONNX Runtime GenAI (CPU provider) behind the executor interface: an og.Generator fed the
    prompt ids and then each chosen token with append_tokens, logits read with get_logits."""

    name = "ortgenai"

    def __init__(self, path, threads: int | None = None, max_length: int = 4096, **_):
        try:
            import onnxruntime_genai as og
        except ImportError as e:
            raise SystemExit("engine ortgenai needs onnxruntime-genai: pip install 'edgelm[peers]'") from e
        from edgelm.config import physical_cores
        from edgelm.tokenizer import Tokenizer

        self.path, self.max_length = Path(path), max_length
        if not (self.path / "genai_config.json").exists():
            raise SystemExit(f"engine ortgenai wants a model folder with genai_config.json, not {path}")
        threads = threads or physical_cores()
        config = og.Config(str(self.path))
        config.clear_providers()  # CPU
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.params = og.GeneratorParams(self.model)
        self.params.set_search_options(max_length=max_length)  # KV buffer size, like llama.cpp's n_ctx
        self.generator = og.Generator(self.model, self.params)
        self.tokenizer = Tokenizer.from_hf_folder(self.path)  # same ids as edgelm's GGUF tokenizer
        self.genai_config = json.loads((self.path / "genai_config.json").read_text())["model"]

    def _last_logits(self) -> torch.Tensor:
        logits = np.asarray(self.generator.get_logits())  # (1, 1, V): the last position only
        return torch.from_numpy(logits.reshape(-1).astype(np.float32, copy=True))

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.generator.rewind_to(0)  # reuse the KV buffer: no allocation inside the timed prefill
        self.generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return self._last_logits()

    def decode(self, token: int) -> torch.Tensor:
        self.generator.append_tokens(np.asarray([token], dtype=np.int32))
        return self._last_logits()

    def cache_bytes(self) -> int:
        """K and V buffers, fp32 on CPU, preallocated for max_length (past_present_share_buffer)."""
        d = self.genai_config["decoder"]
        return 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_size"] * self.max_length * 4

    def weight_bytes(self) -> int:
        """The model files on disk (graph + external data), as llama.cpp counts its GGUF. An int8
        build keeps a float32 embedding table (Gather reads one row a token), so this overstates
        the bytes a decode step reads and understates its roofline fraction."""
        return sum(f.stat().st_size for f in self.path.glob("*.onnx*"))


def engine(spec: str, path: str, threads: int):
    backend, _, quant = spec.partition(":")
    if backend == "ortgenai":
        return OrtGenAIExecutor(quant, threads=threads)
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
