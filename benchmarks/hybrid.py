"""Granite 4.0-H hybrids on CPU: edgelm vs transformers' torch path, and cache memory vs dense.

    python benchmarks/hybrid.py [--lengths 512,4096,16384] [--hf-max 4096] [--decode-tokens 16]
                                [--threads 2] [--variants dense,moe] [--memory 32768,131072]
                                [--quant int8|int4]

Models (random weights, one copy shared by both engines): `dense` is Granite-4.0-H-350M-shaped
(32 layers, attention at 10/13/17/27, hidden 768, 48 Mamba heads of 32, state 128, shared MLP
2048, vocab 100352, tied); `moe` swaps the shared MLP for 32 experts (top-4, width 256) plus a
1024-wide shared expert. Prefill is one forward with a fresh cache keeping the last logits only
(transformers: `logits_to_keep=1`, as generate() does); decode is ms/token after a 512-token
prompt. transformers is skipped above --hf-max tokens (its CPU chunk scan is O(chunks·l²·H)
memory and minutes per run). Cache memory is the bytes actually allocated by the caches after a
1-token forward with caches preallocated for the context (edgelm's static cache), against a dense
all-attention model of the same width.
"""

import argparse
import os
import statistics
import time

import torch

ATTENTION_LAYERS = (10, 13, 17, 27)


def hybrid_config(variant: str) -> dict:
    moe = variant == "moe"
    return {
        "model_type": "granitemoehybrid",
        "vocab_size": 100352,
        "hidden_size": 768,
        "num_hidden_layers": 32,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "layer_types": ["attention" if i in ATTENTION_LAYERS else "mamba" for i in range(32)],
        "mamba_n_heads": 48,
        "mamba_d_head": 32,
        "mamba_d_state": 128,
        "mamba_n_groups": 1,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": 256,
        "num_local_experts": 32 if moe else 0,
        "num_experts_per_tok": 4 if moe else 0,
        "intermediate_size": 256 if moe else 2048,
        "shared_intermediate_size": 1024 if moe else 2048,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.246,
        "attention_multiplier": 0.015625,
        "logits_scaling": 3.0,
        "position_embedding_type": "nope",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }


def build_pair(cfg: dict):
    """(transformers model, edgelm model) sharing one set of weights (no copy)."""
    import transformers

    from edgelm.loader import assign_weights
    from edgelm.models import build_model, get_model_module

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").eval()
    with torch.device("meta"):
        model = build_model(hf_config.to_dict())
    weights = get_model_module(cfg["model_type"]).sanitize(dict(ref.state_dict()), cfg)
    assign_weights(model, weights, torch.float32)
    return ref, model.eval().fuse()


@torch.inference_mode()
def prefill_edgelm(model, ids: torch.Tensor) -> float:
    cache = model.make_cache()
    t = time.perf_counter()
    model(ids, cache, num_logits=1)
    return time.perf_counter() - t


@torch.inference_mode()
def prefill_hf(ref, ids: torch.Tensor) -> float:
    import transformers

    cache = transformers.DynamicCache(config=ref.config)
    t = time.perf_counter()
    ref(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


@torch.inference_mode()
def decode_edgelm(model, ids: torch.Tensor, n: int) -> float:
    cache = model.make_cache()
    tok = model(ids, cache, num_logits=1).argmax(-1)
    t = time.perf_counter()
    for _ in range(n):
        tok = model(tok, cache).argmax(-1)
    return (time.perf_counter() - t) / n * 1e3


@torch.inference_mode()
def decode_hf(ref, ids: torch.Tensor, n: int) -> float:
    import transformers

    cache = transformers.DynamicCache(config=ref.config)
    tok = ref(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    t = time.perf_counter()
    for _ in range(n):
        tok = ref(tok, past_key_values=cache, use_cache=True).logits.argmax(-1)
    return (time.perf_counter() - t) / n * 1e3


@torch.inference_mode()
def hybrid_cache_bytes(model, context: int) -> tuple[int, int]:
    """(KV bytes, Mamba-state bytes) the hybrid's caches really allocate for `context` tokens."""
    from edgelm.cache import MambaCache

    cache = model.make_cache(max_size=context)
    model(torch.zeros(1, 1, dtype=torch.long), cache, num_logits=1)
    kv = sum(c.nbytes for c in cache if not isinstance(c, MambaCache))
    return kv, sum(c.nbytes for c in cache if isinstance(c, MambaCache))


def dense_cache_bytes(cfg: dict, context: int, dtype: torch.dtype) -> int:
    """KV bytes a dense model of the same width (every layer attention) allocates."""
    from edgelm.cache import KVCache

    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    k = torch.zeros(1, cfg["num_key_value_heads"], 1, head_dim, dtype=dtype)
    caches = [KVCache(max_size=context) for _ in range(cfg["num_hidden_layers"])]
    for c in caches:
        c.update(k, k)  # allocates the whole context; only the first position's pages are touched
    return sum(c.nbytes for c in caches)


def speed_rows(variant: str, args):
    """Yield table rows as they are measured (a slow, shared machine still gets partial results):
    cache memory first (cheap), then decode, then prefill from the shortest prompt up."""
    cfg = hybrid_config(variant)
    ref, model = build_pair(cfg)
    if variant == "dense":
        yield from memory_rows(cfg, model, args.memory)
    g = torch.Generator().manual_seed(0)
    warm = torch.randint(0, cfg["vocab_size"], (1, 64), generator=g)
    prefill_edgelm(model, warm), prefill_hf(ref, warm)  # first calls pay one-off allocations
    ids = torch.randint(0, cfg["vocab_size"], (1, 512), generator=g)
    e = statistics.median(decode_edgelm(model, ids, args.decode_tokens) for _ in range(args.repeat))
    h = statistics.median(decode_hf(ref, ids, args.decode_tokens) for _ in range(args.repeat))
    yield row(variant, "decode after 512 (ms/token)", e, h, higher=False)
    yield row(variant, "decode, Mamba step on the module path (ms/token)", plain_decode(model, ids, args, True), h, higher=False)
    yield row(variant, "decode, plain path: that and MKL linears (ms/token)", plain_decode(model, ids, args), h, higher=False)
    if args.quant:  # the same weights quantized in place (edgelm's modules only; transformers keeps fp32)
        from edgelm.quant.quantize import quantize_decoder

        quantize_decoder(model, args.quant)
        e = statistics.median(decode_edgelm(model, ids, args.decode_tokens) for _ in range(args.repeat))
        yield row(variant, f"decode after 512 (ms/token), edgelm {args.quant} weights", e, h, higher=False)
        e = plain_decode(model, ids, args)
        yield row(variant, f"decode, {args.quant}, Mamba step on the module path (ms/token)", e, h, higher=False)
        return
    for n in args.lengths:
        ids = torch.randint(0, cfg["vocab_size"], (1, n), generator=g)
        e = min(prefill_edgelm(model, ids) for _ in range(args.repeat))
        h = min(prefill_hf(ref, ids) for _ in range(args.repeat)) if n <= args.hf_max else None
        yield row(variant, f"prefill {n} (tok/s)", n / e, n / h if h else None, higher=True)


def plain_decode(model, ids, args, kernel_linears: bool = False) -> float:
    """Decode ms/token with the Mamba mixers' one-call C++ step switched off, and unless
    `kernel_linears` the dense fp32 linears on their modules (MKL) instead of edgelm's kernel."""
    from edgelm import kernels
    from edgelm.layers.mamba2 import Mamba2Mixer

    mixers = [m for m in model.modules() if isinstance(m, Mamba2Mixer)]
    for m in mixers:
        m.fast = False
    kernels.FEW_ROW_LINEARS = kernel_linears
    try:
        return statistics.median(decode_edgelm(model, ids, args.decode_tokens) for _ in range(args.repeat))
    finally:
        kernels.FEW_ROW_LINEARS = True
        for m in mixers:
            del m.fast


def row(variant: str, what: str, ours: float, theirs: float | None, higher: bool) -> str:
    if theirs is None:
        return f"| {variant} | {what} | {ours:.1f} | skipped | |"
    ratio = ours / theirs if higher else theirs / ours
    return f"| {variant} | {what} | {ours:.1f} | {theirs:.1f} | {ratio:.2f}x |"


def memory_rows(cfg: dict, model, contexts: list[int]) -> list[str]:
    rows = []
    for n in contexts:
        kv, state = hybrid_cache_bytes(model, n)
        dense = dense_cache_bytes(cfg, n, torch.float32)
        rows.append(
            f"| memory | cache at {n // 1024}K, fp32 (MiB) | hybrid {(kv + state) / 2**20:.0f} "
            f"(KV {kv / 2**20:.0f} + Mamba state {state / 2**20:.1f}) | dense {dense / 2**20:.0f} "
            f"| {dense / (kv + state):.1f}x less |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="512,4096,16384")
    p.add_argument("--hf-max", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="dense,moe")
    p.add_argument("--moe-lengths", default="512,4096")
    p.add_argument("--memory", default="32768,131072")
    p.add_argument("--quant", choices=["int8", "int4"], default=None,
                   help="also decode with edgelm's weights quantized (transformers stays fp32); skips prefill")
    args = p.parse_args()

    from edgelm.config import configure_runtime, set_threads

    set_threads(args.threads)
    configure_runtime()
    args.memory = [int(x) for x in args.memory.split(",")]
    start = time.perf_counter()
    print(f"threads {args.threads}, load average at start {os.getloadavg()[0]:.1f}\n")
    print("| model | measure | edgelm | transformers | edgelm speed-up |")
    print("|---|---|---|---|---|")
    for variant in args.variants.split(","):
        lengths = args.lengths if variant == "dense" else args.moe_lengths
        args_v = argparse.Namespace(**{**vars(args), "lengths": [int(x) for x in lengths.split(",")]})
        for r in speed_rows(variant, args_v):
            print(r, flush=True)
    print(f"\nwall time {time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
