"""Load test of `edgelm serve`: N concurrent streaming chat clients against SmolLM2 on loopback.

    python benchmarks/server_load.py [--duration 120] [--clients 1,4,8,16] [--max-tokens 64] [--quant dequantize] [--server llama.cpp]

Starts the server as a subprocess (so client work does not share its GIL), then for each client
count runs that many closed-loop clients for `--duration` seconds: each sends a streaming chat
request, reads it to the end, and sends the next. No request starts after the deadline; those in
flight finish. Prints a Markdown table: aggregate generated tokens/s, p50/p99 time to first token
and inter-token latency (between streamed chunks), the server's peak RSS, failed requests.
"""

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one paragraph.",
    "Give me three tips for learning to code.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
]


@dataclass
class Level:
    clients: int
    tokens: int = 0
    requests: int = 0
    failed: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cache_mb: float | None = None  # edgelm_cache_bytes_allocated from /metrics, sampled


async def one_request(
    http: httpx.AsyncClient, url: str, question: str, max_tokens: int, level: Level
) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = last = time.perf_counter()
    first, usage, chunks = True, None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                (level.ttft if first else level.itl).append(now - (t0 if first else last))
                first, last, chunks = False, now, chunks + 1
    level.tokens += usage["completion_tokens"] if usage else chunks  # llama.cpp: one token per chunk


async def client_loop(i: int, url: str, deadline: float, max_tokens: int, level: Level) -> None:
    async with httpx.AsyncClient(timeout=600) as http:
        n = 0
        while time.perf_counter() < deadline:
            try:
                await one_request(http, url, QUESTIONS[(i + n) % len(QUESTIONS)], max_tokens, level)
                level.requests += 1
            except Exception as e:  # counted, reported; the load goes on
                level.failed += 1
                print(f"client {i}: {e}", file=sys.stderr)
            n += 1


async def poll_cache(url: str, deadline: float, level: Level) -> None:
    """Sample the server's allocated KV bytes every 0.5 s (edgelm only: llama.cpp has no /metrics)."""
    async with httpx.AsyncClient(timeout=10) as http:
        while time.perf_counter() < deadline:
            try:
                text = (await http.get(f"{url}/metrics")).text
            except httpx.HTTPError:
                return
            for line in text.splitlines():
                if line.startswith("edgelm_cache_bytes_allocated "):
                    mb = float(line.split()[1]) / 2**20
                    level.peak_cache_mb = max(mb, level.peak_cache_mb or 0.0)
            await asyncio.sleep(0.5)


async def run_level(url: str, clients: int, duration: float, max_tokens: int, pid: int) -> Level:
    level = Level(clients)
    t0 = time.perf_counter()
    await asyncio.gather(
        poll_cache(url, t0 + duration, level),
        *(client_loop(i, url, t0 + duration, max_tokens, level) for i in range(clients)),
    )
    level.elapsed = time.perf_counter() - t0
    level.peak_rss_mb = peak_rss_mb(pid)
    return level


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, port: int) -> list[str]:
    """edgelm's server, or llama-cpp-python's OpenAI server on the same GGUF and threads (the
    peer: it serves one sequence at a time, queuing concurrent requests)."""
    if args.server == "llama.cpp":
        threads = str(args.threads or 2)
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(args.model), "--port", str(port),
                "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "4096",
                "--interrupt_requests", "False"]  # queue concurrent requests instead of cutting streams
    cmd = [
        sys.executable,
        "-m",
        "edgelm",
        "serve",
        "--model",
        str(args.model),
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--max-cache-mb",
        str(args.max_cache_mb),
        "--quant",
        args.quant,
    ]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = server_command(args, port)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 180 s")


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.0f}"


def table(levels: list[Level]) -> str:
    rows = [
        (
            "| clients | requests | generated tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
            "| ITL p99 (ms) | peak RSS (MB) | peak KV cache (MB) | failed |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        rows.append(
            f"| {lv.clients} | {lv.requests} | {lv.tokens / lv.elapsed:.1f} | {pct(lv.ttft, 0.5)} | "
            f"{pct(lv.ttft, 0.99)} | {pct(lv.itl, 0.5)} | {pct(lv.itl, 0.99)} | {lv.peak_rss_mb:.0f} "
            f"| {'-' if lv.peak_cache_mb is None else f'{lv.peak_cache_mb:.1f}'} | {lv.failed} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load per client count")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request (EOS ignored)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-cache-mb", type=int, default=256, help="the server's KV budget (serve --max-cache-mb)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quant", choices=["auto", "dequantize", "int8", "int4"], default="auto",
                   help="edgelm's weights (serve --quant): auto = the GGUF's int4 as is; dequantize = fp32, "
                   "memory-bound per step, so batched rows cost little more than one")
    p.add_argument("--server", choices=["edgelm", "llama.cpp"], default="edgelm",
                   help="llama.cpp: llama-cpp-python's server (pip install sse-starlette starlette-context "
                   "pydantic-settings); it does not honour ignore_eos, so its requests may end early")
    args = p.parse_args()
    proc, url = start_server(args)
    try:
        levels = []
        for n in [int(x) for x in args.clients.split(",")]:
            levels.append(asyncio.run(run_level(url, n, args.duration, args.max_tokens, proc.pid)))
            print(f"{n} clients: {levels[-1].tokens} tokens in {levels[-1].elapsed:.1f} s", file=sys.stderr)
        print(
            f"\n{args.server} server, {Path(args.model).stem} (--quant {args.quant}), max batch {args.max_batch}, KV budget {args.max_cache_mb} MB, threads {args.threads or 'default'}, "
            f"{args.max_tokens} tokens per request, {args.duration:g} s per level\n"
        )
        print(table(levels))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
