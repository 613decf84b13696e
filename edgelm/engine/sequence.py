"""One request's state in the batched engine: its tokens, sampling, stop rules and streamed text.

A sequence holds `token_ids` (prompt, then generated) and `num_cached`, how many of them are in the
KV cache. Every forward feeds `token_ids[num_cached:end]`; when `end == num_tokens` the last logits
pick the next token. So a fresh prompt, a preempted sequence being recomputed and a decode step are
the same operation with different lengths.
"""

import enum
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from edgelm.generate import _StopMatcher
from edgelm.sampling import check_sampling_args, make_sampler


@dataclass
class SamplingParams:
    """What a request asks for. `logprobs`: None = none, 0 = the sampled token's, k = plus top k."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: Seq[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def check(self) -> None:
        check_sampling_args(self.temperature, self.top_p, self.top_k, self.min_p)
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class StepOutput:
    """What one engine step produced for one sequence (text may be empty while held back)."""

    seq_id: int
    token: int | None
    text: str
    finish_reason: str | None  # None while running, then "stop", "length", "abort" or "error"
    logprob: TokenLogprob | None
    num_prompt_tokens: int
    num_output_tokens: int


class Sequence:
    def __init__(
        self,
        seq_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        eos_ids: Seq[int] = (),
        tokenizer=None,
        context_length: int,
    ):
        self.id = seq_id
        self.token_ids = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.num_cached = 0
        self.params = params
        self.max_tokens = min(params.max_tokens, context_length - self.num_prompt)  # as generate_step
        self.eos_ids = frozenset(() if params.ignore_eos else eos_ids)
        # Each request samples with its own generator, so its draws never depend on its neighbours.
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.sampler = make_sampler(
            params.temperature, params.top_p, params.top_k, params.min_p, self.generator
        )
        self.detok = tokenizer.detokenizer(context=self.token_ids) if tokenizer is not None else None
        self.stopper = _StopMatcher(params.stop)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.saved_kv = None  # set while parked (LLMEngine.park): the cache to restore on resume

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def is_prefilling(self) -> bool:
        """More than one token to feed: the prompt (or, after preemption, prompt + output)."""
        return self.num_tokens - self.num_cached > 1

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """logits (1, V) float32 -> (token, its logprob entry if requested)."""
        token = int(self.sampler(logits))
        if self.params.logprobs is None:
            return token, None
        logprobs = logits[0].log_softmax(-1)  # of the model's distribution, before temperature
        top = logprobs.topk(self.params.logprobs) if self.params.logprobs else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return token, TokenLogprob(token, float(logprobs[token]), pairs)

    def append_token(self, token: int, logprob: TokenLogprob | None = None) -> StepOutput:
        """Add a sampled token; stop on EOS, a stop string or the token budget (as stream_generate)."""
        self.token_ids.append(token)
        if token in self.eos_ids:
            return self._output(token, *self._finalize("", "stop"), logprob)
        text, hit = self.stopper.feed(self.detok.add_token(token) if self.detok is not None else "")
        if hit:
            return self._output(token, text, "stop", logprob)
        if self.num_output >= self.max_tokens:
            return self._output(token, *self._finalize(text, "length"), logprob)
        return self._output(token, text, None, logprob)

    def finish(self, reason: str) -> StepOutput:
        """End early: "abort", "error", or "length" when the cache budget leaves no room to grow."""
        text, reason = self._finalize("", reason) if reason == "length" else ("", reason)
        return self._output(None, text, reason, None)

    def _finalize(self, text: str, reason: str) -> tuple[str, str]:
        """Flush held-back text; it may still complete a stop string."""
        rest, hit = self.stopper.feed(self.detok.finalize() if self.detok is not None else "")
        return (text + rest, "stop") if hit else (text + rest + self.stopper.flush(), reason)

    def _output(self, token: int | None, text: str, reason: str | None, logprob) -> StepOutput:
        if reason is not None:
            self.status, self.finish_reason = Status.FINISHED, reason
        return StepOutput(self.id, token, text, reason, logprob, self.num_prompt, self.num_output)

    def preempt(self) -> None:
        """Drop the cache (recompute later); generated tokens are kept and re-fed as prompt."""
        self.num_cached = 0
        self.saved_kv = None
        self.status = Status.WAITING
