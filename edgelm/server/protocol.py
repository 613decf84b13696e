"""OpenAI API shapes: request models (validated by pydantic) and response/chunk builders.

Only the fields edgelm acts on are declared; others (presence_penalty, user, ...) are ignored.
Extensions, as in vLLM: `top_k`, `min_p`, `ignore_eos`.
"""

import time
import uuid
from collections.abc import Callable
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from edgelm.engine import SamplingParams, StepOutput, TokenLogprob


class APIError(Exception):
    """An error the client sees as {"error": {"message", "type", "code"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, lt=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    default_max_tokens: ClassVar[int] = 16

    @property
    def num_logprobs(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self) -> list[SamplingParams]:
        """One per choice; with a seed, choice i samples with seed + i (distinct, reproducible)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_tokens or self.default_max_tokens
        return [
            SamplingParams(
                max_tokens,
                self.temperature,
                self.top_p,
                self.top_k,
                self.min_p,
                None if self.seed is None else self.seed + i,
                stop,
                self.ignore_eos,
                self.num_logprobs,
            )
            for i in range(self.n)
        ]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    default_max_tokens: ClassVar[int] = 1 << 30  # until EOS or the context is full, as OpenAI does

    def model_post_init(self, _) -> None:
        self.max_tokens = self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict]:
        """Messages as the chat template wants them: text parts joined into one string."""
        out = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):
                if any(p.get("type") != "text" for p in content):
                    raise APIError(400, "only text content parts are supported")
                content = "".join(p.get("text", "") for p in content)
            out.append({**(m.model_extra or {}), "role": m.role, "content": content})
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


class Renderer:
    """Builds one endpoint's response objects; `token_text(id)` spells a token for logprobs."""

    object_type = chunk_type = id_prefix = ""

    def __init__(self, model: str, token_text: Callable[[int], str]):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.model, self.token_text, self.created = model, token_text, int(time.time())

    def _envelope(self, obj: str, choices: list, usage_: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None:
            out["usage"] = usage_
        return out

    def chunk(self, index: int, out: StepOutput) -> dict:
        return self._envelope(self.chunk_type, [self.stream_choice(index, out)])

    def usage_chunk(self, usage_: dict) -> dict:
        return self._envelope(self.chunk_type, [], usage_)

    def response(self, choices: list["Choice"], usage_: dict) -> dict:
        return self._envelope(self.object_type, [self.final_choice(c) for c in choices], usage_)


class Choice:
    """One sequence's collected result for a non-streaming response."""

    def __init__(self, index: int):
        self.index, self.parts, self.logprobs, self.finish_reason, self.num_tokens = index, [], [], None, 0

    def add(self, out: StepOutput) -> None:
        self.parts.append(out.text)
        if out.logprob is not None:
            self.logprobs.append(out.logprob)
        self.finish_reason, self.num_tokens = out.finish_reason, out.num_output_tokens

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ChatRenderer(Renderer):
    object_type, chunk_type, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def role_chunk(self, index: int) -> dict:
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._envelope(self.chunk_type, [choice])

    def stream_choice(self, index: int, out: StepOutput) -> dict:
        lp = {"content": [self._entry(out.logprob)]} if out.logprob is not None else None
        delta = {"content": out.text} if out.text else {}
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}

    def final_choice(self, c: Choice) -> dict:
        lp = {"content": [self._entry(x) for x in c.logprobs]} if c.logprobs else None
        message = {"role": "assistant", "content": c.text}
        return {"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}

    def _entry(self, lp: TokenLogprob) -> dict:
        top = [self._top(t, v) for t, v in lp.top]
        return {**self._top(lp.token, lp.logprob), "top_logprobs": top}

    def _top(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class CompletionRenderer(Renderer):
    object_type, chunk_type, id_prefix = "text_completion", "text_completion", "cmpl"

    def role_chunk(self, index: int) -> None:
        return None

    def stream_choice(self, index: int, out: StepOutput) -> dict:
        lp = self._logprobs([out.logprob], out.text) if out.logprob is not None else None
        return {"index": index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}

    def final_choice(self, c: Choice) -> dict:
        lp = self._logprobs(c.logprobs, c.text) if c.logprobs else None
        return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}

    def _logprobs(self, entries: list[TokenLogprob], text: str) -> dict:
        tokens = [self.token_text(e.token) for e in entries]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token_text(t): v for t, v in e.top} for e in entries],
            "text_offset": offsets,
        }
