"""edgelm's C++ kernels (edgelm/kernels) against their plain references.

- int4 ("blocks") and int8 matmuls == the same maths in float64 on the int16-rounded activations
  (exact up to fp32 summation order), and within 1e-4 of the unrounded dequantized reference;
- the fast decode step == the module path to fp32 rounding (stories260K, SmolLM2 dense and as its
  int4/int8 GGUF) for decode, multi-token verify, a batch, and the engine's per-row offsets;
- with InfLLM v2 sparse attention the step (kernel pooling, block selection, attention over the
  chosen blocks) == the module path too;
- it stands aside (module path) for what it does not implement.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgelm import kernels, load
from edgelm.engine.runner import SlotKVCache, attention_shapes
from edgelm.kernels import llama as fast
from edgelm.layers.sparse_attention import SparseConfig
from edgelm.quant.linear import Int4Linear, Int8Linear

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not kernels.available(), reason="edgelm's C++ kernels did not build here"),
]

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOL = str(SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
DATA = SHARED / "data"


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """The kernels' int16 rounding of x (M, K) per 32-block, dequantized: the same fp32 steps as
    cpu.cpp (d = amax / 32767, q = round-half-even(x * (1 / d)))."""
    M, K = x.shape
    xb = x.reshape(M, K // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 32767
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).reshape(M, K)


def make(kind: str, N: int, K: int, bias: bool):
    linear = torch.nn.Linear(K, N, bias=bias)
    if kind == "int8":
        return Int8Linear.from_float(linear)
    return Int4Linear.from_float(linear, int(kind[6:]), symmetric=False)  # "int4_g64"


# K: 4, 18 (8 + 8 + 2 tail), 48 and 11 blocks; each group size with the K it divides. N: 10 or 11
# 8-row tiles; int8 also with a 3-row tail (int4 needs N % 16 == 0, so it never has one).
MATMUL_CASES = [
    (kind, K, N)
    for kind in ["int4_g32", "int4_g64", "int4_g128", "int8"]
    for K in [128, 576, 1536, 352]
    for N in ([80, 83] if kind == "int8" else [80, 96])
    if kind == "int8" or K % int(kind[6:]) == 0
]


@pytest.mark.parametrize("kind,K,N", MATMUL_CASES)
@pytest.mark.parametrize("M", [1, 3, 4, 9])
def test_matmul_equals_reference_on_rounded_activations(kind, K, N, M):
    m = make(kind, N, K, bias=True)
    assert kind == "int8" or m.layout == "blocks"
    x = torch.randn(M, K) * torch.linspace(0.1, 3, K)  # uneven magnitudes across blocks
    y = m.kernel(x)
    w = m.dequantize().double()
    exact = rounded_activations(x).double() @ w.T + m.bias.double()
    assert (y.double() - exact).abs().max() / exact.abs().max() < 1e-5
    ref = x.double() @ w.T + m.bias.double()
    assert (y.double() - ref).norm() / ref.norm() < 1e-4


@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 21, 64, 65])
@pytest.mark.parametrize("N,K", [(80, 576), (83, 100)], ids=["even", "odd-rows-K-tail"])
def test_dense_fp32_matmul(M, N, K):
    """Kind 0: f32_rows for up to 64 rows (passes of 8; two weight rows per pass up to 6 rows, one
    above 6; odd weight rows and the K tail), torch's GEMM above."""
    linear = torch.nn.Linear(K, N)
    w, b = linear.weight.detach(), linear.bias.detach()
    handle = kernels.ext().make_linear(0, w, torch.empty(0), b)
    x = torch.randn(M, K)
    ref = x.double() @ w.double().T + b.double()
    y = kernels.ext().linear(handle, x)
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-6
    if M <= 64:  # batch-invariant: a row's output does not depend on the rows beside it
        assert torch.equal(y[-1:], kernels.ext().linear(handle, x[-1:]))


@torch.inference_mode()
def test_linear_uses_the_kernel_for_few_rows_unless_hooked():
    """kernels.linear: the few-rows kernel for ≤ few_rows rows (≈ the module's output), the module
    itself for more rows, with autograd, or while hooks watch it (the profiler)."""
    linear = torch.nn.Linear(96, 40)
    calls = []
    x = torch.randn(1, 3, 96)
    y = kernels.linear(linear, x)
    torch.testing.assert_close(y, linear(x), atol=1e-5, rtol=0)
    assert torch.equal(y, kernels.dense_linear(linear, x))  # the kernel's result, not the module's
    handle = linear.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    try:
        kernels.linear(linear, x)
        assert calls == [x.shape]
    finally:
        handle.remove()
    many = torch.randn(kernels.ext().few_rows + 1, 96)
    assert kernels.dense_linear(linear, many) is None
    assert torch.equal(kernels.linear(linear, many), linear(many))


def test_zero_and_constant_blocks():
    m = make("int4_g32", 64, 96, bias=False)
    x = torch.zeros(2, 96)
    x[1, 32:64] = 0.5  # one constant block, two all-zero blocks
    exact = rounded_activations(x).double() @ m.dequantize().double().T
    assert torch.allclose(m.kernel(x).double(), exact, atol=1e-5)


def step_pair(model, tokens, caches):
    """The same forward through the module path and the fast step, each on its own cache."""
    model.fast_decode = False
    ref = model(tokens, caches[0])
    model.fast_decode = True
    out = model(tokens, caches[1])
    return ref, out


@torch.inference_mode()
def check_paths_agree(model, prompt: list[int], tol: float = 1e-4):
    """Logits of both paths within `tol` x max|logit| over decode steps and a 4-token verify."""
    caches = [model.make_cache(), model.make_cache()]
    model.fast_decode = False
    for c in caches:
        model(torch.tensor([prompt]), c)
    for t in [7, 11, 13]:  # decode
        ref, out = step_pair(model, torch.tensor([[t]]), caches)
        assert (out - ref).abs().max() < tol * ref.abs().max()
    ref, out = step_pair(model, torch.tensor([[3, 5, 8, 2]]), caches)  # a speculative verify
    assert (out - ref).abs().max() < tol * ref.abs().max()
    assert caches[0][0].offset == caches[1][0].offset == len(prompt) + 7
    assert fast.hidden_states(model, torch.tensor([[1]]), caches[1], _ctx(caches[1], 1)) is not None


def _ctx(cache, L):
    from edgelm.layers.attention import ForwardContext

    return ForwardContext.make(torch.zeros(1, L, dtype=torch.long), cache[0].offset, None)


@pytest.mark.parametrize("prompt_len", [5, 150])  # attention's vector loops and their tails
@pytest.mark.parametrize("parts", [None, 1, 3], ids=["per-head", "grouped", "grouped-3-parts"])
def test_fast_step_equals_module_path_dense_stories(stories, prompt_len, parts):
    """`parts` forces the long-context attention (KV-head groups, keys split in that many parts,
    merged by their softmax maxima; 3 parts of a 5-token prompt leave some parts empty)."""
    prompt = [1] + torch.randint(3, 512, (prompt_len - 1,), generator=torch.Generator().manual_seed(1)).tolist()
    ext = kernels.ext()
    ext.set_group_attention_bytes(256 << 10 if parts is None else 0)
    ext.set_attention_parts(parts or 0)
    try:
        check_paths_agree(stories.fuse(), prompt)
    finally:
        ext.set_group_attention_bytes(256 << 10)
        ext.set_attention_parts(0)


def test_fast_step_equals_module_path_dense_smollm2():
    check_paths_agree(load(SMOL, dequantize=True), [1, 504, 3458, 282, 260, 1345])


@torch.inference_mode()
def test_fast_step_equals_module_path_quantized_gguf():
    """int4/int8 GGUF weights: both paths run the same kernels, but fp32 differences of ~1e-7
    (norms, attention) can flip an int16 rounding of an activation: ~1e-4 relative (measured)."""
    check_paths_agree(load(SMOL), [1, 504, 3458, 282, 260, 1345], tol=1e-3)


# Small InfLLM v2 settings so that selection is real on short prompts: ~10 blocks, 1 init block, a
# 2-3 block window, top-3 of the rest; dense_len 64 puts a verify across the dense/sparse boundary.
SMALL_SPARSE = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3, dense_len=64)


@pytest.mark.parametrize("prompt_len", [60, 150])
def test_fast_step_equals_module_path_sparse_stories(stories, prompt_len):
    """Block selection, kernel pooling of the new keys and attention over the chosen blocks in C++
    against layers/sparse_attention.py (the module path), decode and a 4-token verify."""
    model = stories.fuse()  # the session's model: sparse attention is switched off again after
    model.set_sparse_attention(SMALL_SPARSE)
    prompt = [1] + torch.randint(3, 512, (prompt_len - 1,), generator=torch.Generator().manual_seed(2)).tolist()
    try:
        check_paths_agree(model, prompt)
    finally:
        model.set_sparse_attention(None)


def test_fast_step_equals_module_path_sparse_smollm2_text():
    """Real weights on real text, 300 tokens, sparse well past dense_len."""
    model = load(SMOL, dequantize=True)
    model.set_sparse_attention(SparseConfig(block_size=32, kernel_size=16, kernel_stride=8, window_size=64, topk=3, dense_len=128))
    text = (DATA / "python-library-docs.txt").read_text()[:4000]
    check_paths_agree(model, model.tokenizer.encode(text)[:300])


@torch.inference_mode()
def test_fast_step_batch_and_engine_rows(stories):
    model = stories.fuse()
    prompts = [[1, 403, 407, 261], [1, 92, 73, 22, 5, 9, 12], [1, 50]]
    # a uniform batch of 2
    caches = [model.make_cache(), model.make_cache()]
    model.fast_decode = False
    for c in caches:
        model(torch.tensor([prompts[0], prompts[0][::-1]]), c)
    ref, out = step_pair(model, torch.tensor([[5], [6]]), caches)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    # the engine's slots: rows at different offsets in one decode forward
    results = []
    for use_fast in (False, True):
        cache = SlotKVCache(attention_shapes(model), 4, torch.float32, 64)
        for p in prompts:
            s = cache.add_slot()
            cache.reserve(len(p))
            model.fast_decode = use_fast
            model(torch.tensor([p]), cache.slot_view(s))
            cache.lengths[s] = len(p)
        cache.reserve(max(cache.lengths) + 1)
        results.append(model(torch.tensor([[4], [7], [9]]), cache.rows_view()))
    assert (results[1] - results[0]).abs().max() < 1e-4 * results[0].abs().max()


@torch.inference_mode()
def test_fast_step_stands_aside(stories):
    model = stories.fuse()
    cache = model.make_cache()
    model(torch.tensor([[1, 2, 3]]), cache)
    tokens = torch.tensor([[4]])
    assert fast.hidden_states(model, tokens, cache, _ctx(cache, 1)) is not None
    long = torch.zeros(1, fast.MAX_ROWS + 1, dtype=torch.long)
    assert fast.hidden_states(model, long, cache, _ctx(cache, long.shape[1])) is None  # prefill
    with torch.enable_grad():
        assert fast.hidden_states(model, tokens, cache, _ctx(cache, 1)) is None  # training
    model.set_sparse_attention(SparseConfig(dense_len=64))
    assert fast.hidden_states(model, tokens, cache, _ctx(cache, 1)) is None  # sparse, but no kernel cache
    model.set_sparse_attention(SparseConfig(dense_len=64, kernel_size=64))
    sparse_cache = model.make_cache()
    model.set_sparse_attention(SparseConfig(dense_len=64))
    model(torch.tensor([[1, 2, 3]]), sparse_cache)
    assert fast.hidden_states(model, tokens, sparse_cache, _ctx(sparse_cache, 1)) is None  # other kernels
    model.set_sparse_attention(None)
    assert fast.hidden_states(model, tokens, cache, _ctx(cache, 1)) is not None  # rebuilt


TINY = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)


@pytest.mark.parametrize(
    "extra",
    [
        dict(model_type="qwen2", rope_theta=1e6),  # q/k/v biases
        dict(model_type="llama", head_dim=32, partial_rotary_factor=0.5,  # partial rotary, llama3 scaling
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=64)),
        dict(model_type="granite", embedding_multiplier=12.0, residual_multiplier=0.22,
             attention_multiplier=0.015625, logits_scaling=8.0),  # μP multipliers
    ],
    ids=["qwen2-bias", "partial-llama3-rope", "granite-mup"],
)
def test_fast_step_on_config_variants(extra):
    from edgelm.models import build_model
    from edgelm.profiler.bench import randomize_

    model = randomize_(build_model({**TINY, **extra}).float()).fuse()
    check_paths_agree(model, list(range(1, 40)))


@pytest.mark.parametrize("kind", ["int4_g32", "int4_g128", "int8"])
def test_dequantize_is_bit_identical_to_the_reference(kind):
    m = make(kind, 101 if kind == "int8" else 96, 256, bias=False)  # int8: 12 tiles and a 5-row tail
    assert torch.equal(m.dense_weight(torch.float32), m.dequantize())
