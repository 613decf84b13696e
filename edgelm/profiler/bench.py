"""`edgelm bench`: median prefill/decode speed, TTFT, memory, and the decode roofline.

Decode of one token reads every weight once, so its speed limit is bandwidth / weight bytes. We
measure this machine's read bandwidth (a large `sum`) in the same run and report the fraction of
that roofline the decode loop reaches.
"""

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from edgelm.generate import generate_step, peak_rss_mb


def measure_bandwidth_gbs(num_bytes: int = 512 << 20, repeat: int = 7) -> float:
    """Median read bandwidth of a streaming reduction over a buffer much larger than the caches."""
    buf = torch.ones(num_bytes // 4)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return num_bytes / statistics.median(times[1:]) / 1e9


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every parameter/buffer except the embedding table (one row is
    gathered) -- unless it doubles as the tied LM head, which is read in full."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() in seen or name.endswith(("inv_freq",)):
            continue
        seen.add(t.data_ptr())
        if name.startswith("model.embed_tokens.") and not tied:
            continue
        total += t.numel() * t.element_size()
    return total


def synthetic_prompt(model, num_tokens: int) -> list[int]:
    """Real text (so attention patterns are realistic), cut to exactly num_tokens."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[3] / "shared/data/python-library-docs.txt"
    text = docs.read_text()[:400_000] if docs.exists() else "The quick brown fox jumps over the lazy dog. " * 2000
    ids = model.tokenizer.encode(text) if model.tokenizer else []
    if len(ids) < num_tokens:
        ids = (ids or [1]) * (num_tokens // max(len(ids), 1) + 1)
    return ids[:num_tokens]


@dataclass
class BenchRun:
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float


def run_once(model, prompt: list[int], gen_tokens: int, step_fn=None, out: list | None = None) -> BenchRun:
    """One generation with `generate_step` (or `step_fn`, same signature); tokens go to `out`."""
    out = [] if out is None else out
    t0 = time.perf_counter()
    steps = (step_fn or generate_step)(model, prompt, max_tokens=gen_tokens)
    out.append(next(steps)[0])
    t1 = time.perf_counter()
    out.extend(t for t, _ in steps)
    t2 = time.perf_counter()
    n = len(out) - 1
    return BenchRun(t1 - t0, len(prompt) / (t1 - t0), n / (t2 - t1) if n else 0.0)


def bench_speculative(model, make_step_fn, prompt_tokens: int, gen_tokens: int, repeat: int, progress=None) -> dict:
    """Plain greedy decode and speculative decode on the same prompt, alternating, in one run:
    median tok/s of each, the speed-up, mean accepted length (tokens per target forward), and
    whether the outputs are identical (they must be, greedy)."""
    prompt = synthetic_prompt(model, prompt_tokens)
    run_once(model, prompt[:16], 4)  # warm-up
    plain, spec, stats, same = [], [], [], True
    for _ in range(repeat):
        ref, out, step_fn = [], [], make_step_fn()
        plain.append(run_once(model, prompt, gen_tokens, out=ref).decode_tok_s)
        spec.append(run_once(model, prompt, gen_tokens, step_fn, out).decode_tok_s)
        stats.append(step_fn.stats)
        same &= out == ref
        if progress:
            progress()
    base, fast = statistics.median(plain), statistics.median(spec)
    return {
        "plain_decode_tok_s": round(base, 4),
        "speculative_decode_tok_s": round(fast, 4),
        "speculative_speedup": round(fast / base, 3),
        "mean_accepted_length": round(statistics.median(s.mean_accepted_length for s in stats), 3),
        "acceptance_rate": round(statistics.median(s.acceptance_rate for s in stats), 3),
        "identical_to_plain": same,
    }


def dense_equivalent_caches(model, context: int) -> list:
    """KV caches for the dense configuration of the model's width: every layer attention, shaped
    like its attention layers (what a hybrid's Mamba layers replace)."""
    from edgelm.cache import KVCache
    from edgelm.inspect import attention_layers

    attn = attention_layers(model)
    if not attn:
        raise ValueError(f"{type(model).__name__} has no attention layer to size a dense configuration by")
    return [KVCache(max_size=context) for _ in model.layers], attn[0]


@torch.inference_mode()
def cache_memory(model, context: int, batch: int = 1) -> dict:
    """Bytes the caches really allocate for `batch` sequences preallocated to `context` tokens
    (static KV cache; Mamba states are fixed-size), after a one-token forward, against the dense
    configuration of the same width. The dense caches are allocated the same way (untouched pages
    cost address space, not RAM)."""
    from edgelm.cache import MambaCache

    if context <= 0 or batch <= 0:
        raise ValueError(f"--context and --batch must be positive, got {context} and {batch}")
    if context > model.context_length:
        raise ValueError(f"--context {context} exceeds the model's context of {model.context_length}")
    cache = model.make_cache(max_size=context)
    model(torch.zeros(batch, 1, dtype=torch.long), cache, num_logits=1)
    state = sum(c.nbytes for c in cache if isinstance(c, MambaCache))
    kv = sum(c.nbytes for c in cache) - state
    dense, attn = dense_equivalent_caches(model, context)
    k = torch.zeros(batch, attn.num_kv_heads, 1, attn.head_dim, dtype=model.dtype)
    for c in dense:
        c.update(k, k)
    dense_bytes = sum(c.nbytes for c in dense)
    del dense
    return {
        "context": context,
        "batch": batch,
        "kv_cache_bytes": kv,
        "state_cache_bytes": state,
        "cache_bytes": kv + state,
        "dense_equivalent_cache_bytes": dense_bytes,
        "dense_over_this": round(dense_bytes / max(kv + state, 1), 2),
    }


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights in working ranges, for speed and memory runs of an architecture from its
    config alone (no checkpoint): norms ~1, Mamba decays per step 0.3..0.99, matrices N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D"):
                p.fill_(1.0)
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 - 2)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def bench(model, prompt_tokens: int = 512, gen_tokens: int = 256, repeat: int = 5, progress=None, step_fn=None) -> dict:
    """Median over `repeat` runs (after one warm-up) plus memory and roofline figures. `model` may
    be an executor of another back-end (with `step_fn = executor_step_fn(executor)`)."""
    context = getattr(model, "context_length", None)
    if context is not None and prompt_tokens + gen_tokens > context:
        raise ValueError(f"prompt {prompt_tokens} + generation {gen_tokens} tokens exceed the context of {context}")
    prompt = synthetic_prompt(model, prompt_tokens)
    run_once(model, prompt[:16], 4, step_fn)  # warm-up: allocator, lazy init
    runs = []
    for _ in range(repeat):
        runs.append(run_once(model, prompt, gen_tokens, step_fn))
        if progress:
            progress()
    med = {k: statistics.median(getattr(r, k) for r in runs) for k in asdict(runs[0])}
    wbytes = model.weight_bytes() if hasattr(model, "weight_bytes") else weight_bytes_per_token(model)
    peak_rss = peak_rss_mb()  # before the bandwidth probe allocates its 512 MB buffer
    bandwidth = measure_bandwidth_gbs()
    roofline = bandwidth * 1e9 / wbytes
    return {
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeat": repeat,
        "threads": torch.get_num_threads(),
        **{k: round(v, 4) for k, v in med.items()},
        "peak_rss_mb": round(peak_rss, 1),
        "weight_bytes_per_token": wbytes,
        "bandwidth_gb_s": round(bandwidth, 2),
        "decode_roofline_tok_s": round(roofline, 1),
        "roofline_fraction": round(med["decode_tok_s"] / roofline, 3),
    }
