"""The OpenAI-compatible HTTP server (needs the `server` extra: FastAPI and uvicorn).

    serve(model, port=8000)                     blocking, as `edgelm serve` runs it
    app, engine = build_app(model)              an ASGI app over a running AsyncEngine
    server = start_in_thread(app)               uvicorn on a background thread (tests, benchmarks)

FastAPI and uvicorn are imported only here, when a server is built.
"""

import threading
import time
from pathlib import Path

DEFAULT_CACHE_BYTES = 1 << 30


def require_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"the server needs FastAPI and uvicorn ({e.name} is missing): install edgelm[server]"
        ) from e


def model_name(model) -> str:
    return Path(getattr(model, "source", "model")).stem


def build_app(
    model,
    *,
    max_batch: int = 8,
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    prefill_chunk: int = 256,
    api_key: str | None = None,
    max_waiting: int = 64,
    name: str | None = None,
):
    """-> (FastAPI app, AsyncEngine); the engine thread runs until `engine.shutdown()`."""
    require_server_deps()
    if model.tokenizer is None:
        raise ValueError("the server needs the model's tokenizer: pass --tokenizer")
    from edgelm.engine import AsyncEngine, LLMEngine
    from edgelm.server.app import ServerConfig, create_app

    engine = AsyncEngine(LLMEngine(model, max_batch, max_cache_bytes, prefill_chunk))
    config = ServerConfig(name or model_name(model), api_key, max_n=max_batch, max_waiting=max_waiting)
    return create_app(engine, config), engine


def serve(model, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Serve until interrupted (kwargs as `build_app`)."""
    import uvicorn

    app, engine = build_app(model, **kwargs)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.shutdown()


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Start uvicorn on a daemon thread; returns the `uvicorn.Server` once it listens.
    Its `.port` is the bound port (port=0 picks a free one); stop it with `stop_thread_server`."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    server.thread = threading.Thread(target=server.run, name="edgelm-http", daemon=True)
    server.thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not server.thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    server.port = server.servers[0].sockets[0].getsockname()[1]
    return server


def stop_thread_server(server, timeout: float = 30.0) -> None:
    server.should_exit = True
    server.thread.join(timeout)
