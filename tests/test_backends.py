"""One executor interface: every back-end agrees on greedy tokens for the same GGUF and prompt."""

import importlib.util
from pathlib import Path

import pytest
import torch

from edgelm.backends import get_executor, greedy_tokens

SMOL = Path(__file__).resolve().parents[2] / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n"
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def native():
    return get_executor("native")(SMOL, threads=2, dtype=torch.float32)


@pytest.fixture(scope="module")
def native_tokens(native):
    ids = native.tokenizer.encode(PROMPT, add_special_tokens=False)
    return ids, greedy_tokens(native, ids, 8)


@pytest.mark.parametrize("name", ["transformers", "llama.cpp"])
def test_backends_agree_on_greedy_tokens(name, native_tokens):
    ids, expected = native_tokens
    if name == "llama.cpp" and not HAVE_LLAMA_CPP:  # `make test` installs it; say so if it failed
        with pytest.raises(ValueError, match=r"install it with: pip install 'edgelm\[peers\]'"):
            get_executor(name)
        return
    other = get_executor(name)(SMOL, threads=2)
    assert other.tokenizer.encode(PROMPT, add_special_tokens=False) == ids
    assert greedy_tokens(other, ids, 8) == expected


def test_native_reports_memory(native, native_tokens):
    ids, _ = native_tokens
    native.prefill(ids)
    assert native.cache_bytes() > 0
    assert native.weight_bytes() > 100e6  # fp32 SmolLM2


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown back-end 'onnx'"):
        get_executor("onnx")


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python did not build (make test installs it)")
def test_generate_and_bench_on_llama_cpp_backend(native, native_tokens, capsys):
    """`--backend llama.cpp` runs the same CLI paths: greedy text equals the native engine's, and
    bench reports speed and the roofline for the peer."""
    import json

    from edgelm.cli import main

    ids, expected = native_tokens
    args = ["--model", str(SMOL), "--threads", "2"]
    assert main(["generate", *args, "--backend", "llama.cpp", "--prompt", PROMPT, "--max-tokens", "8",
                 "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == native.tokenizer.decode(expected)
    assert main(["bench", *args, "--backend", "llama.cpp", "--prompt-tokens", "16", "--gen-tokens", "4",
                 "--repeat", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "llama.cpp" and report["decode_tok_s"] > 0 and report["weight_bytes_per_token"] > 50e6
