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
