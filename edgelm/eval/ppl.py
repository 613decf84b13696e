"""Sliding-window perplexity over a long text (`edgelm eval ppl`).

Windows of `ctx` tokens start every `stride` tokens, and each window scores only its last `stride`
tokens, so every scored token sees between ctx - stride and ctx tokens of context: this measures
long-context quality (and is where sparse attention applies), not short-prompt quality. Logits are
computed `chunk` positions at a time through the cache; one (ctx, vocab) matrix would be 1.6 GB at
8K positions for a 49K vocabulary.
"""

import math
import time
from dataclasses import dataclass

import torch


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    ctx: int
    stride: int
    seconds: float


def window_starts(num_tokens: int, ctx: int, stride: int, max_windows: int | None) -> list[int]:
    if num_tokens < ctx:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than --ctx {ctx}: use a longer text")
    starts = list(range(0, num_tokens - ctx + 1, stride))
    return starts[:max_windows] if max_windows else starts


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, score_from: int, chunk: int) -> float:
    """Summed NLL of ids[0, score_from:] (ids (1, ctx)), feeding the window `chunk` tokens a call."""
    cache, total, ctx = model.make_cache(), 0.0, ids.shape[1]
    for a in range(0, ctx, chunk):
        logits = model(ids[:, a : a + chunk], cache)[0]  # (c, V); row i predicts token a + i + 1
        lo, hi = max(a, score_from - 1), min(a + logits.shape[0], ctx - 1)
        if lo < hi:
            logp = logits[lo - a : hi - a].log_softmax(-1)
            total -= float(logp.gather(-1, ids[0, lo + 1 : hi + 1, None]).sum())
    return total


def perplexity(
    model, ids, ctx: int, stride: int | None = None, max_windows: int | None = None, chunk: int = 512
) -> PerplexityResult:
    """Perplexity of token ids over windows of `ctx` tokens (default stride ctx // 2)."""
    stride = stride or max(1, ctx // 2)
    if not 0 < stride <= ctx:
        raise ValueError(f"--stride must be in [1, ctx={ctx}], got {stride}")
    if ctx > model.context_length:
        raise ValueError(f"--ctx {ctx} exceeds the model's context of {model.context_length} tokens")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    starts = window_starts(ids.shape[1], ctx, stride, max_windows)
    score_from = max(1, ctx - stride)
    t0, total = time.perf_counter(), 0.0
    for s in starts:
        total += window_nll(model, ids[:, s : s + ctx], score_from, chunk)
    n = len(starts) * (ctx - score_from)
    nll = total / n
    return PerplexityResult(math.exp(nll), nll, n, len(starts), ctx, stride, time.perf_counter() - t0)
