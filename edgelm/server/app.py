"""OpenAI-compatible routes over an `AsyncEngine`.

    GET  /v1/models            the one model served (its file stem; "default" is accepted too)
    POST /v1/completions       text or token-id prompt
    POST /v1/chat/completions  messages rendered with the model's chat template
    GET  /health, /metrics     liveness; Prometheus text

Every error is {"error": {"message", "type", "code"}}: 400 for bad input (malformed JSON, invalid
parameters, a prompt longer than the context), 401 without the API key, 404 for an unknown model,
429 (with Retry-After) when too many requests wait. A streaming client that disconnects has its
sequences aborted, which frees their cache.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from edgelm.engine import AsyncEngine, StepOutput
from edgelm.server.metrics import Metrics
from edgelm.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatRenderer,
    Choice,
    CompletionRenderer,
    CompletionRequest,
    Renderer,
    error_body,
    usage,
)

log = logging.getLogger("edgelm.server")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_n: int = 8  # most choices per request
    max_waiting: int = 64  # queued sequences beyond which new requests get 429


class Server:
    """The routes' state: the engine, the tokenizer, the config and the metrics."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine, self.config, self.metrics = engine, config, Metrics()
        self.model = engine.engine.model
        self.tokenizer = self.model.tokenizer
        self._anchor = self.tokenizer.encode("a", add_special_tokens=False)[-1]

    # -- routes -------------------------------------------------------------------------------

    async def models(self) -> dict:
        card = {
            "id": self.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "edgelm",
            "max_model_len": self.model.context_length,
        }
        return {"object": "list", "data": [card]}

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        render = CompletionRenderer(self.config.model_name, self._token_text)
        return await self._generate(request, body, self._completion_ids(body.prompt), render)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        render = ChatRenderer(self.config.model_name, self._token_text)
        return await self._generate(request, body, self._chat_ids(body), render)

    async def health(self) -> dict:
        return {"status": "ok"}

    async def prometheus(self) -> PlainTextResponse:
        return PlainTextResponse(
            self.metrics.render(self.engine.stats), media_type="text/plain; version=0.0.4"
        )

    def check_auth(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.config.api_key}":
            raise APIError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                "invalid_request_error",
                "invalid_api_key",
            )

    # -- request -> prompt ids ----------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name not in (self.config.model_name, "default"):
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.config.model_name}`.",
                "invalid_request_error",
                "model_not_found",
            )

    def _completion_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty: give at least one token of text")
            return self.tokenizer.encode(prompt)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})")
        return list(prompt)

    def _chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise APIError(400, f"model `{self.config.model_name}` has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(body.chat_messages(), add_generation_prompt=True)
        except APIError:
            raise
        except Exception as e:  # jinja raises on roles a template does not accept
            raise APIError(400, f"could not apply the chat template: {e}") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _token_text(self, token: int) -> str:
        # Decoded after an anchor token, so a sentencepiece piece keeps its leading space.
        anchor = self._anchor
        return self.tokenizer.decode([anchor, token])[len(self.tokenizer.decode([anchor])) :]

    # -- generation ---------------------------------------------------------------------------

    async def _generate(self, request: Request, body, ids: list[int], render: Renderer):
        t0 = time.perf_counter()
        if body.n > self.config.max_n:
            raise APIError(400, f"n must be at most {self.config.max_n}, got {body.n}")
        if self.engine.num_waiting >= self.config.max_waiting:
            raise APIError(
                429,
                "the server is at capacity; retry shortly",
                "rate_limit_error",
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        try:
            seq_ids, queue = self.engine.submit(ids, body.sampling_params())
        except ValueError as e:
            raise APIError(400, str(e)) from e
        self.metrics.prompt_tokens += len(ids)
        watch = _Latency(self.metrics, t0)
        if body.stream:
            events = self._stream(queue, seq_ids, render, body.include_usage, len(ids), watch)
            return StreamingResponse(events, media_type="text/event-stream")
        return await self._collect(request, queue, seq_ids, render, len(ids), watch)

    async def _stream(self, queue, seq_ids, render: Renderer, include_usage: bool, num_prompt: int, watch):
        index, live, completion = {s: i for i, s in enumerate(seq_ids)}, set(seq_ids), 0
        try:
            for i in range(len(seq_ids)):
                if (chunk := render.role_chunk(i)) is not None:
                    yield _sse(chunk)
            while live:
                out: StepOutput = await queue.get()
                watch.token(out)
                if out.finish_reason == "error":
                    yield _sse(error_body("generation failed on the server", "server_error"))
                    return
                if out.finish_reason is not None:
                    live.discard(out.seq_id)
                    completion += out.num_output_tokens
                if out.text or out.finish_reason or out.logprob:
                    yield _sse(render.chunk(index[out.seq_id], out))
            if include_usage:
                yield _sse(render.usage_chunk(usage(num_prompt, completion)))
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect (the response task is cancelled)
            if live:
                self.engine.abort(list(live))

    async def _collect(self, request: Request, queue, seq_ids, render: Renderer, num_prompt: int, watch):
        choices = {s: Choice(i) for i, s in enumerate(seq_ids)}
        live = set(seq_ids)
        watcher = asyncio.create_task(_signal_disconnect(request, queue))
        try:
            while live:
                out: StepOutput | None = await queue.get()
                if out is None:
                    raise APIError(499, "client closed the request")
                watch.token(out)
                if out.finish_reason == "error":
                    raise APIError(500, "generation failed on the server", "server_error")
                choices[out.seq_id].add(out)
                if out.finish_reason is not None:
                    live.discard(out.seq_id)
        finally:
            watcher.cancel()
            if live:
                self.engine.abort(list(live))
        done = list(choices.values())
        return render.response(done, usage(num_prompt, sum(c.num_tokens for c in done)))


async def _signal_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Put None on the queue when the client goes away (the body is read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(None)


class _Latency:
    """Feeds TTFT (arrival to first token) and inter-token latency into the metrics."""

    def __init__(self, metrics: Metrics, t0: float):
        self.metrics, self.t0, self.last = metrics, t0, {}

    def token(self, out: StepOutput) -> None:
        if out.token is None:
            return
        now = time.perf_counter()
        self.metrics.generation_tokens += 1
        if not self.last:
            self.metrics.ttft.observe(now - self.t0)
        elif out.seq_id in self.last:
            self.metrics.itl.observe(now - self.last[out.seq_id])
        self.last[out.seq_id] = now


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _CountStatus:
    """ASGI middleware counting /v1 responses by status (works for streaming responses too)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


async def _api_error(_, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _validation_error(_, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return JSONResponse(error_body("malformed JSON in the request body", "invalid_request_error"), 400)
    parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in errors]
    return JSONResponse(error_body("; ".join(parts), "invalid_request_error"), status_code=400)


async def _internal_error(_, e: Exception) -> JSONResponse:
    log.exception("request failed", exc_info=e)
    return JSONResponse(error_body(f"internal error ({type(e).__name__})", "server_error"), status_code=500)


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app for one engine (the caller owns the engine's lifetime)."""
    server = Server(engine, config)
    app = FastAPI(title="edgelm", docs_url=None, redoc_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.check_auth)])
    v1.add_api_route("/models", server.models, methods=["GET"])
    v1.add_api_route("/completions", server.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", server.chat, methods=["POST"])
    app.include_router(v1)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"])
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(_CountStatus, metrics=server.metrics)
    app.state.server = server
    return app
