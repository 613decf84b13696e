"""The OpenAI-compatible server, driven by the real `openai` client over loopback.

stories260K (no chat template) serves completions; SmolLM2 (ChatML) serves the chat tests. Greedy
output must equal `edgelm.generate.generate` on the same prompt, alone or among 8 concurrent
requests; every error comes back with its status and an OpenAI-shaped body; a client that
disconnects mid-stream gets its sequence aborted and its cache freed.
"""

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from edgelm import load
from edgelm.generate import generate
from edgelm.server import build_app, start_in_thread, stop_thread_server

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = "stories260K"
PROMPTS = [
    "Once upon a time",
    "The cat sat on the",
    "Lily and Ben went to the park. They saw a big",
    "One day, a little dog",
    "Tom had a red ball",
    "The sun was hot and the sky was",
    "Mom said",
    "The bird flew",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def running(model, **kwargs):
    app, engine = build_app(model, **kwargs)
    server = start_in_thread(app)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        stop_thread_server(server)
        engine.shutdown()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and not ln.startswith("#"))}


@pytest.fixture(scope="module")
def smol():
    return load(SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def stories_url(stories):
    with running(stories, max_batch=8) as url:
        yield url


@pytest.fixture(scope="module")
def smol_url(smol):
    with running(smol, max_batch=4) as url:
        yield url


def complete(url: str, prompt: str, max_tokens: int = 40, **kw):
    kw = {"temperature": 0} | kw
    return client(url).completions.create(model=STORIES, prompt=prompt, max_tokens=max_tokens, **kw)


# --- outputs ------------------------------------------------------------------------------------


def test_models_and_health(stories_url):
    assert [m.id for m in client(stories_url).models.list().data] == [STORIES]
    assert httpx.get(f"{stories_url}/health").json() == {"status": "ok"}


def test_completion_greedy_equals_generate(stories, stories_url):
    expected = generate(stories, PROMPTS[0], max_tokens=40)
    r = complete(stories_url, PROMPTS[0])
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, 40)
    chunks = list(complete(stories_url, PROMPTS[0], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings(stories, stories_url):
    r = complete(stories_url, PROMPTS[0], max_tokens=80, stop="Lily")
    assert r.choices[0].text == ", there was a little girl named " and r.choices[0].finish_reason == "stop"
    r = client(stories_url).completions.create(
        model="default", prompt=PROMPTS[0], max_tokens=80, temperature=0, stop=["park", "Lily"]
    )
    assert r.choices[0].text == generate(stories, PROMPTS[0], max_tokens=80, stop=["park", "Lily"]).text


def test_eight_concurrent_requests_equal_solo(stories, stories_url):
    expected = [generate(stories, p, max_tokens=48).text for p in PROMPTS]

    def one(i: int) -> str:
        if i % 2:  # half streaming, half not
            return "".join(c.choices[0].text for c in complete(stories_url, PROMPTS[i], 48, stream=True))
        return complete(stories_url, PROMPTS[i], 48).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == expected


def test_include_usage_and_n(stories_url):
    chunks = list(complete(stories_url, PROMPTS[1], 10, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    c = client(stories_url)
    r = c.completions.create(model=STORIES, prompt=PROMPTS[1], max_tokens=12, n=2, temperature=1.0, seed=7)
    assert sorted(ch.index for ch in r.choices) == [0, 1] and r.usage.completion_tokens == 24
    again = c.completions.create(
        model=STORIES, prompt=PROMPTS[1], max_tokens=12, n=2, temperature=1.0, seed=7
    )
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]  # seeded: reproducible
    stream = c.completions.create(
        model=STORIES, prompt=PROMPTS[1], max_tokens=12, n=2, temperature=1.0, seed=7, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [ch.text for ch in r.choices]


def test_completion_logprobs(stories_url):
    r = complete(stories_url, PROMPTS[0], 6, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text  # greedy: each token is its own top choice


def test_chat_greedy_equals_generate(smol, smol_url):
    question = "What is the capital of France?"
    expected = generate(smol, question, chat=True, max_tokens=12)
    c = client(smol_url)
    messages = [{"role": "user", "content": question}]
    r = c.chat.completions.create(model="default", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == expected.prompt_tokens
    stream = c.chat.completions.create(
        model="default",
        messages=messages,
        max_completion_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_chat_logprobs(smol_url):
    r = client(smol_url).chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the top token


# --- errors -------------------------------------------------------------------------------------


def status_of(fn) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value.status_code, e.value.body


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        (dict(model="gpt-4"), 404, "does not exist"),
        (dict(temperature=-0.5), 400, "temperature"),
        (dict(max_tokens=0), 400, "max_tokens"),
        (dict(top_p=0), 400, "top_p"),
        (dict(n=9), 400, "n must be at most 8"),
        (dict(logprobs=50), 400, "logprobs"),
        (dict(prompt="hello " * 600), 400, "context is 512 tokens"),
        (dict(prompt=[1, 99999]), 400, "token ids"),
        (dict(prompt=""), 400, "empty"),
    ],
)
def test_invalid_requests(stories_url, kwargs, status, message):
    args = dict(model=STORIES, prompt="Hello", max_tokens=4) | kwargs
    code, body = status_of(lambda: client(stories_url).completions.create(**args))
    assert code == status and message in body["message"] and body["type"]


def test_prompt_over_context_names_sizes(stories, stories_url):
    prompt = "hello " * 600
    _, body = status_of(lambda: complete(stories_url, prompt))
    n = len(stories.tokenizer.encode(prompt))
    assert f"prompt has {n} tokens" in body["message"] and "context is 512 tokens" in body["message"]


def test_malformed_json_and_missing_fields(stories_url):
    r = httpx.post(
        f"{stories_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{stories_url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]


def test_chat_without_template(stories_url):
    code, body = status_of(
        lambda: client(stories_url).chat.completions.create(
            model=STORIES, messages=[{"role": "user", "content": "hi"}]
        )
    )
    assert code == 400 and "chat template" in body["message"]


def test_bad_request_beside_good_ones(stories, stories_url):
    expected = generate(stories, PROMPTS[2], max_tokens=40).text

    def bad(i: int):
        return status_of(lambda: complete(stories_url, PROMPTS[i], temperature=-1))[0]

    with ThreadPoolExecutor(4) as pool:
        good = pool.submit(
            lambda: "".join(c.choices[0].text for c in complete(stories_url, PROMPTS[2], stream=True))
        )
        assert list(pool.map(bad, range(3))) == [400] * 3
        assert good.result() == expected


def test_api_key(stories):
    with running(stories, api_key="sesame") as url:
        code, body = status_of(lambda: client(url, "wrong").models.list())
        assert code == 401 and body["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert client(url, "sesame").completions.create(model=STORIES, prompt="Hi", max_tokens=3).choices
        assert httpx.get(f"{url}/health").status_code == 200


# --- load and disconnects -----------------------------------------------------------------------


def open_stream(http: httpx.Client, url: str, chunks: int = 2):
    """Start a long streaming chat; return the open response after `chunks` data lines."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    response = http.send(http.build_request("POST", f"{url}/v1/chat/completions", json=body), stream=True)
    assert response.status_code == 200
    response.lines = response.iter_lines()  # kept: a dropped line iterator closes the response
    for _ in range(chunks):
        while not next(response.lines).startswith("data: "):
            pass
    return response


def wait_for(url: str, condition, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(url)
        if condition(m):
            return m
        time.sleep(0.1)
    raise AssertionError(f"metrics never met the condition: {m}")


def test_disconnect_aborts_and_frees_cache(smol_url):
    before = metrics(smol_url)["edgelm_generation_tokens_total"]
    with httpx.Client(timeout=60) as http:
        response = open_stream(http, smol_url)
        during = metrics(smol_url)
        assert during["edgelm_num_requests_running"] == 1 and during["edgelm_cache_bytes_in_use"] > 0
        response.close()  # the client goes away mid-stream
    after = wait_for(smol_url, lambda m: m["edgelm_num_requests_running"] == 0)
    assert after["edgelm_cache_bytes_in_use"] == 0 and after["edgelm_cache_bytes_allocated"] == 0
    assert after["edgelm_generation_tokens_total"] - before < 400  # stopped early, not run out


def test_non_streaming_disconnect_aborts(smol_url):
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 400 tokens
        httpx.post(f"{smol_url}/v1/chat/completions", json=body, timeout=1.5)
    after = wait_for(smol_url, lambda m: m["edgelm_num_requests_running"] == 0)
    assert after["edgelm_cache_bytes_in_use"] == 0


def test_full_queue_gets_429(smol):
    with running(smol, max_batch=1, max_waiting=1) as url, httpx.Client(timeout=60) as http:
        running_one = open_stream(http, url, chunks=2)  # role chunk + a first token: it runs
        waiting_one = open_stream(http, url, chunks=0)  # headers only: it sits in the queue
        wait_for(url, lambda m: m["edgelm_num_requests_waiting"] == 1)
        code, body = status_of(
            lambda: client(url).chat.completions.create(
                model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        )
        assert code == 429 and body["code"] == "rate_limit_exceeded"
        r = httpx.post(f"{url}/v1/completions", json={"model": "default", "prompt": "hi"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        running_one.close()
        waiting_one.close()
        wait_for(url, lambda m: m["edgelm_num_requests_running"] + m["edgelm_num_requests_waiting"] == 0)
        counts = metrics(url)
        assert counts['edgelm_requests_total{status="429"}'] == 2


def test_metrics_format(stories_url):
    complete(stories_url, PROMPTS[0], 5)
    text = httpx.get(f"{stories_url}/metrics").text
    for name in (
        "edgelm_requests_total",
        "edgelm_prompt_tokens_total",
        "edgelm_generation_tokens_total",
        "edgelm_num_requests_waiting",
        "edgelm_num_requests_running",
        "edgelm_cache_bytes_in_use",
        "edgelm_time_to_first_token_seconds",
        "edgelm_inter_token_latency_seconds",
    ):
        assert f"# TYPE {name} " in text
    m = metrics(stories_url)
    assert (
        m['edgelm_requests_total{status="200"}'] >= 1 and m["edgelm_time_to_first_token_seconds_count"] >= 1
    )
    assert (
        m['edgelm_inter_token_latency_seconds_bucket{le="+Inf"}']
        == m["edgelm_inter_token_latency_seconds_count"]
    )
    json.dumps(m)


def test_server_deps_are_optional(monkeypatch):
    import subprocess
    import sys

    from edgelm.server import require_server_deps

    code = "import sys, edgelm.server, edgelm.engine; assert 'fastapi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)  # imported only when a server is built
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(ValueError, match=r"install edgelm\[server\]"):
        require_server_deps()
