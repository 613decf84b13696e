"""Shared test fixtures: every test starts from the same random state."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _kernels_built():
    """Build edgelm's C++ kernels (~1 min, cached) once up front, so that no test's timing or
    server start-up timeout includes the build."""
    from edgelm import kernels

    kernels.available()


@pytest.fixture(scope="session")
def smol_ref():
    """transformers' fp32 model of the SmolLM2 Q4_1 GGUF (dequantized by transformers itself): the
    reference for parity tests. Session-scoped: reading a GGUF through transformers takes ~30 s."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = Path(__file__).resolve().parents[2] / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Small forwards are overhead-bound, and on a busy 2-core machine OpenMP's second thread makes
    every small matmul wait for a free core (measured 10x slower); one thread is as exact. Modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stories():
    """stories260K (llama2.c checkpoint) in fp32, one per test module (tests may change its state)."""
    from pathlib import Path

    from edgelm.loader import load

    return load(Path(__file__).resolve().parents[2] / "shared/models/stories260K/stories260K.bin", dtype=torch.float32)
