"""Batch-1 generation as a generator: prompt ids in, tokens (and timing) out.

`generate_step` is the token loop (model + cache + sampler); `stream_generate` adds the tokenizer,
stop conditions and timing; `generate` collects the stream. The CLI, the server and the profiler all
consume these.
"""

import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from edgelm.sampling import LogitsProcessor, Sampler, make_sampler

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory for long prompts


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_prompt(num_tokens: int, context_length: int) -> None:
    if num_tokens == 0:
        raise ValueError("prompt is empty: give at least one token of text")
    if num_tokens >= context_length:
        raise ValueError(
            f"prompt has {num_tokens} tokens but the model's context is {context_length} tokens; "
            "shorten the prompt (at least one position must be left to generate)"
        )


@torch.inference_mode()
def prefill(model, tokens: torch.Tensor, cache: list, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run the prompt (1, L) through the model in chunks; returns the last position's logits (1, V)."""
    for start in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, start : start + chunk], cache, num_logits=1)
    return logits[:, -1]


@torch.inference_mode()
def generate_step(
    model,
    prompt: Sequence[int] | torch.Tensor,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = 256,
    cache: list | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, logits (V,) it was sampled from) until max_tokens or the context is full."""
    sampler = sampler or make_sampler()
    tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    check_prompt(tokens.shape[1], model.context_length)
    cache = cache if cache is not None else model.make_cache()
    logits = prefill(model, tokens, cache, prefill_chunk)
    history = tokens
    for _ in range(min(max_tokens, model.context_length - tokens.shape[1])):
        for process in logits_processors:
            logits = process(history, logits)
        token = sampler(logits)  # (1,)
        yield int(token), logits[0]
        history = torch.cat([history, token[:, None]], dim=1)
        logits = model(token[:, None], cache)[:, -1]


@dataclass
class GenerationResponse:
    text: str  # text completed by this step (may be empty while a UTF-8 char or stop string is pending)
    token: int | None
    finish_reason: str | None  # None while running, then "stop" or "length"
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float


class _StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first full match."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold) if self.stop else len(self.pending)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def encode_prompt(tokenizer, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    if prompt == "":
        raise ValueError("prompt is empty: give at least one token of text")
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def stream_generate(
    model,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    stop: Sequence[str] = (),
    chat: bool = False,
    ignore_eos: bool = False,
    step_fn=None,
) -> Iterator[GenerationResponse]:
    """Generate from text (or ids) and yield text pieces with running statistics.

    `step_fn` replaces `generate_step` (same signature and yields), e.g. speculative decoding's
    `edgelm.speculative.cli.make_step_fn(...)`."""
    tokenizer = model.tokenizer
    ids = encode_prompt(tokenizer, prompt, chat)
    eos = set() if ignore_eos else set(tokenizer.eos_token_ids)
    detok, stopper = tokenizer.detokenizer(context=ids), _StopMatcher(stop)
    t0 = time.perf_counter()
    ttft = prefill_tps = decode_tps = 0.0
    n, finish = 0, None

    def response(text: str, token: int | None, reason: str | None) -> GenerationResponse:
        return GenerationResponse(text, token, reason, len(ids), n, ttft, prefill_tps, decode_tps, peak_rss_mb())

    steps = (step_fn or generate_step)(
        model, ids, sampler=sampler, logits_processors=logits_processors, max_tokens=max_tokens
    )
    for token, _ in steps:
        now = time.perf_counter()
        if n == 0:
            ttft, t_first = now - t0, now
            prefill_tps = len(ids) / ttft
        n += 1
        if n > 1:
            decode_tps = (n - 1) / (now - t_first)
        if token in eos:
            finish = "stop"
            break
        text, hit = stopper.feed(detok.add_token(token))
        if hit:
            yield response(text, token, "stop")
            return
        yield response(text, token, None)
    rest, hit = stopper.feed(detok.finalize())
    yield response(rest if hit else rest + stopper.flush(), None, "stop" if hit else finish or "length")


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float


def generate(model, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
    """Run `stream_generate` to the end and collect the text."""
    parts, last = [], None
    for last in stream_generate(model, prompt, **kwargs):
        parts.append(last.text)
    return GenerationResult(
        "".join(parts), last.prompt_tokens, last.generated_tokens, last.finish_reason,
        last.ttft_s, last.prefill_tok_s, last.decode_tok_s, last.peak_rss_mb,
    )
