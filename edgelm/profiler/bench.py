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


def run_once(model, prompt: list[int], gen_tokens: int) -> BenchRun:
    t0 = time.perf_counter()
    steps = generate_step(model, prompt, max_tokens=gen_tokens)
    next(steps)
    t1 = time.perf_counter()
    n = sum(1 for _ in steps)
    t2 = time.perf_counter()
    return BenchRun(t1 - t0, len(prompt) / (t1 - t0), n / (t2 - t1) if n else 0.0)


def bench(model, prompt_tokens: int = 512, gen_tokens: int = 256, repeat: int = 5, progress=None) -> dict:
    """Median over `repeat` runs (after one warm-up) plus memory and roofline figures."""
    if prompt_tokens + gen_tokens > model.context_length:
        raise ValueError(
            f"prompt {prompt_tokens} + generation {gen_tokens} tokens exceed the context of {model.context_length}"
        )
    prompt = synthetic_prompt(model, prompt_tokens)
    run_once(model, prompt[:16], 4)  # warm-up: allocator, lazy init
    runs = []
    for _ in range(repeat):
        runs.append(run_once(model, prompt, gen_tokens))
        if progress:
            progress()
    med = {k: statistics.median(getattr(r, k) for r in runs) for k in asdict(runs[0])}
    wbytes = weight_bytes_per_token(model)
    bandwidth = measure_bandwidth_gbs()
    roofline = bandwidth * 1e9 / wbytes
    return {
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeat": repeat,
        "threads": torch.get_num_threads(),
        **{k: round(v, 4) for k, v in med.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "weight_bytes_per_token": wbytes,
        "bandwidth_gb_s": round(bandwidth, 2),
        "decode_roofline_tok_s": round(roofline, 1),
        "roofline_fraction": round(med["decode_tok_s"] / roofline, 3),
    }
