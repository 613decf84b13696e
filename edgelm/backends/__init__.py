"""One executor interface over several back-ends (MiniCPM4's ArkInfer idea).

Every back-end loads a model file and exposes the same four steps, so the CLI, the benchmark and
the profiler measure them identically:

    ex = get_executor("native")(path, threads=2)
    logits = ex.prefill(ids)        # (V,) float32 logits after the prompt; resets state first
    logits = ex.decode(token)       # (V,) after one more token
    ex.cache_bytes(), ex.weight_bytes()
"""

import importlib

BACKENDS = {
    "native": ("edgelm.backends.native", "NativeExecutor", None),
    "transformers": ("edgelm.backends.hf", "TransformersExecutor", "test"),
    "llama.cpp": ("edgelm.backends.llamacpp", "LlamaCppExecutor", "peers"),
}


def get_executor(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown back-end {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls, extra = BACKENDS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ValueError(
            f"back-end {name!r} needs a package that is not installed ({e.name}); "
            f"install it with: pip install 'edgelm[{extra}]'"
        ) from e


def greedy_tokens(executor, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation through the executor interface (used to cross-check back-ends)."""
    logits, out = executor.prefill(ids), []
    for _ in range(max_tokens):
        out.append(int(logits.argmax()))
        logits = executor.decode(out[-1])
    return out


def executor_step_fn(executor):
    """A `generate_step`-compatible step function driving `executor`, so `stream_generate`,
    `edgelm generate` and `edgelm bench` run any back-end with edgelm's samplers and stop rules.
    Pass the executor itself as the "model" (it has `.tokenizer`)."""
    import torch

    from edgelm.sampling import make_sampler

    def step(_model, prompt, *, sampler=None, logits_processors=(), max_tokens: int = 256, **_):
        sampler = sampler or make_sampler()
        history = torch.tensor([list(prompt)], dtype=torch.long)
        logits = executor.prefill(list(prompt))[None]  # (1, V)
        for _ in range(max_tokens):
            for process in logits_processors:
                logits = process(history, logits)
            token = sampler(logits)  # (1,)
            yield int(token), logits[0]
            history = torch.cat([history, token[:, None]], dim=1)
            logits = executor.decode(int(token))[None]

    return step
