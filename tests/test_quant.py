"""Quantization contracts:

- every quantized module's forward == F.linear with its own `dequantize()` weight, on both paths
  (int kernel with bf16 activations: relative Frobenius error < 1e-2; dequantize + fp32 GEMM:
  < 1e-5), at M = 1 and M = 64, fp32 and bf16 inputs;
- the int4 kernel convention W = (q - 8) * scale + zero, and packing round trips (CPU layout too);
- quantize -> dequantize error bounds on Gaussian weights;
- GGUF repacks agree with gguf-py's dequantization (`GGUFTensor.to_torch()`): exact int4 types up
  to bf16 rounding of scale and zero, re-quantized int8 types within half a channel scale;
- state_dict -> safetensors -> fresh module is bit-exact; `quantize_model` keeps stories260K's
  greedy tokens; a repacked SmolLM2 Q4_1 GGUF keeps the fp32 model's greedy tokens;
- bad shapes and arguments raise ValueError naming the layer.

The file runs on one intra-op thread: these are correctness tests, and on a shared 2-core box
torch's OpenMP kernels with 2 threads ran the file 4x slower (69 s vs 17 s) whenever other
processes held the cores.
"""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from edgelm import kernels, load
from edgelm.formats.gguf import GGUFTensor, gguf_config, gguf_tensors, read_gguf
from edgelm.models import build_model
from edgelm.quant import (
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    can_quantize,
    fuse_quantized,
    module_for_gguf_tensor,
    quantize_model,
    repack_gguf_model,
    restore_quantized_layout,
)
from edgelm.quant.primitives import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    pack_int4_blocks,
    pack_int4_for_cpu,
    pack_int8_tiles,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    unpack_int4,
    unpack_int4_blocks,
    unpack_int4_from_cpu,
    unpack_int4_rows_from_cpu,
    unpack_int8_tiles,
)

STORIES = "/work/shared/models/stories260K/stories260K.bin"
SMOL_GGUF = "/work/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
KERNEL_RTOL = 1e-2  # torch: bf16 activations and outputs (~3e-3 observed); edgelm: int8 activations per 32-block (~6e-3)
DENSE_RTOL = 1e-5  # dequantize + fp32 F.linear vs the same weight: fp32 summation order only
BF16_REL = 2.0**-8  # bf16 rounding of a scale or zero (2^-9), with a 2x margin
N, K = 80, 256  # 80 rows: one full 64-row packing block and a 16-row tail


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_module(kind: str, bias: bool = False, layout: str | None = None) -> nn.Module:
    linear = nn.Linear(K, N, bias=bias).requires_grad_(False)
    if kind == "int8":
        return Int8Linear.from_float(linear)
    _, g, sym = kind.split("_")  # "int4_g32_sym"
    m = Int4Linear.from_float(linear, int(g[1:]), sym == "sym")
    if layout is not None and layout != m.layout:  # the same codes and scales in the other layout
        m = Int4Linear.from_quantized(m.codes(), *m.scales_zeros(), m.group_size, m.bias, layout)
    return m


# both int4 runtime layouts: edgelm's kernels ("blocks", when built) and torch's ("torch")
LAYOUTS = ["torch", "blocks"] if kernels.available() else ["torch"]


KINDS = ["int4_g32_asym", "int4_g32_sym", "int4_g64_asym", "int4_g128_sym", "int4_g256_asym", "int8"]


# ---- forward == F.linear(x, dequantize()) ---------------------------------------------------


# int8 has one layout; int4 runs in each
KIND_LAYOUTS = [(kind, layout) for kind in KINDS for layout in (["blocks"] if kind == "int8" else LAYOUTS)]


@pytest.mark.parametrize("kind,layout", KIND_LAYOUTS)
@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("path", ["kernel", "dense"])
def test_forward_matches_dequantized_reference(kind, rows, path, layout):
    m = make_module(kind, bias=kind.endswith("asym"), layout=layout)
    m.dequant_min_rows = 1 if path == "dense" else 10**9
    x = torch.randn(1, rows, K)  # (B, L, K): any leading shape
    ref = F.linear(x, m.dequantize(), m.bias)
    y = m(x)
    assert y.shape == (1, rows, N) and y.dtype == torch.float32
    assert rel_err(y, ref) < (KERNEL_RTOL if path == "kernel" else DENSE_RTOL)
    yb = m(x.bfloat16())  # bf16 in -> bf16 out
    assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) < KERNEL_RTOL


def test_default_policy_switches_path_at_threshold():
    m = make_module("int4_g32_asym")
    x = torch.randn(m.dequant_min_rows, K)
    assert rel_err(m(x), F.linear(x, m.dequantize())) < DENSE_RTOL  # dense path: fp32-exact
    assert rel_err(m(x[:1]), F.linear(x[:1], m.dequantize())) < KERNEL_RTOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int4_kernel_convention(layout):
    """Both kernels compute with W = (q - 8) * scale + zero."""
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scales, zeros = torch.rand(N, K // 32) * 0.1 + 0.01, torch.randn(N, K // 32) * 0.1
    m = Int4Linear.from_quantized(q, scales, zeros, 32, layout=layout)
    assert torch.equal(m.codes(), q)
    per_col = lambda t: t.bfloat16().float().repeat_interleave(32, dim=1)  # (N, G) -> (N, K)
    w = (q.float() - 8) * per_col(scales) + per_col(zeros)
    assert torch.equal(m.dequantize(), w)
    assert torch.equal(dequantize_int4(q, scales.bfloat16(), zeros.bfloat16(), 32), w)
    m.dequant_min_rows = 10**9
    x = torch.randn(4, K)
    assert rel_err(m(x), x @ w.T) < KERNEL_RTOL


def test_int8_kernel_convention():
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scale = torch.rand(N) * 0.01
    m = Int8Linear.from_quantized(q, scale)
    w = q.float() * scale.bfloat16().float()[:, None]
    assert torch.equal(m.dequantize(), w)
    x = torch.randn(3, K)
    assert rel_err(m(x), x @ w.T) < KERNEL_RTOL


# ---- packing ------------------------------------------------------------------------------------


def test_portable_pack_round_trip():
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (N, K // 2) and torch.equal(packed[0, 0], q[0, 0] | (q[0, 1] << 4))
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 144])
def test_block_layout_round_trip(rows):
    q = torch.randint(0, 16, (rows, 96), dtype=torch.uint8)
    packed = pack_int4_blocks(q)
    # tile 0, block 0, chunk 0: byte 2i + j = q[i, j] | q[i, 16 + j] << 4 (8 rows' k-pairs side by side)
    assert torch.equal(packed[0, 0], q[0, 0] | (q[0, 16] << 4))
    assert torch.equal(packed[0, 3], q[1, 1] | (q[1, 17] << 4))
    assert torch.equal(unpack_int4_blocks(packed), q)
    picks = torch.tensor([rows - 1, 0, 9, rows - 1])
    assert torch.equal(unpack_int4_blocks(packed, picks), q[picks])


@pytest.mark.parametrize("rows", [16, 19, 83])  # whole 8-row tiles, then row-major tails
def test_int8_tile_layout_round_trip(rows):
    w = torch.randint(-127, 128, (rows, 96), dtype=torch.int8)
    packed = pack_int8_tiles(w)
    assert torch.equal(packed[0, :4], torch.stack([w[0, 0], w[0, 1], w[1, 0], w[1, 1]]))  # 8 rows' k-pairs
    assert torch.equal(packed[-1], w[-1]) == bool(rows % 8)  # a tail row is as it was
    picks = torch.tensor([rows - 1, 0, 9, rows - 1])
    assert torch.equal(unpack_int8_tiles(packed), w)
    assert torch.equal(unpack_int8_tiles(packed, picks), w[picks])


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 144])
def test_cpu_layout_round_trip(rows):
    q = torch.randint(0, 16, (rows, 96), dtype=torch.uint8)
    packed = pack_int4_for_cpu(q)
    assert torch.equal(unpack_int4_from_cpu(packed), q)
    pick = torch.tensor([rows - 1, 0, rows // 2, rows - 1])
    assert torch.equal(unpack_int4_rows_from_cpu(packed, pick), q[pick])


# ---- quantization error ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "group_size,symmetric,bound", [(32, False, 0.085), (32, True, 0.095), (64, False, 0.1), (128, True, 0.11)]
)
def test_int4_error_bound(group_size, symmetric, bound):
    w = torch.randn(256, 512)
    q, s, z = quantize_int4(w, group_size, symmetric)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert rel_err(dequantize_int4(q, s, z, group_size), w) < bound


def test_int8_error_bound():
    w = torch.randn(256, 512)
    q, scale = quantize_int8(w)
    deq = dequantize_int8(q, scale)
    assert rel_err(deq, w) < 0.01
    assert ((deq - w).abs() <= scale.float()[:, None] / 2 * (1 + 1e-5)).all()  # half a step, per element


def test_constant_and_zero_groups():
    w = torch.zeros(16, 64)
    w[1] = 0.5
    for sym in (False, True):
        q, s, z = quantize_int4(w, 32, sym)
        assert torch.equal(dequantize_int4(q, s, z, 32), w)
    q, scale = quantize_int8(w)  # 0.5 / 127 is not a bf16 number: exact zeros, half a step elsewhere
    deq = dequantize_int8(q, scale)
    assert torch.equal(deq[0], w[0]) and ((deq - w).abs() <= scale.float()[:, None] / 2).all()


# ---- GGUF repacking -------------------------------------------------------------------------


def gguf_tensor(type_name: str, data: np.ndarray, shape) -> GGUFTensor:
    return GGUFTensor("t", type_name, tuple(shape), data.reshape(shape[0], -1))


def quantized_tensor(type_name: str, rows: int = N, cols: int = K) -> GGUFTensor:
    """Blocks from gguf-py's quantizer where it has one, else random bytes with sane fp16 scales."""
    rng = np.random.default_rng(0)
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in ("Q4_0", "Q4_1", "Q8_0"):
        data = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
        return gguf_tensor(type_name, data, (rows, cols))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = lambda n: (rng.random(n) * 0.01 + 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    num = rows * cols // block
    if type_name in ("Q4_K", "Q5_K"):  # d | dmin | 12 B scales | ...
        raw[..., 0:2] = scale(num).reshape(rows, -1, 2)
        raw[..., 2:4] = scale(num).reshape(rows, -1, 2)
    elif type_name == "Q6_K":  # ql 128 | qh 64 | int8 scales 16 | d
        raw[..., size - 2 :] = scale(num).reshape(rows, -1, 2)
    return gguf_tensor(type_name, raw, (rows, cols))


def int4_bound(m: Int4Linear) -> torch.Tensor:
    """Per-element bound (N, K) from rounding each group's scale and zero to bf16."""
    s, z = (t.float() for t in m.scales_zeros())  # (N, G)
    return (BF16_REL * (8 * s.abs() + z.abs())).repeat_interleave(m.group_size, dim=1) + 1e-6


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_int4_types_are_exact_up_to_bf16_scales(type_name):
    cols = 512 if type_name == "Q4_K" else K  # K-quants: 256-weight super-blocks
    t = quantized_tensor(type_name, cols=cols)
    m = module_for_gguf_tensor(t)
    assert isinstance(m, Int4Linear) and m.group_size == 32
    ref = t.to_torch()
    assert ((m.dequantize() - ref).abs() <= int4_bound(m)).all()
    assert rel_err(m.dequantize(), ref) < 3e-3


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_K", "Q6_K"])
def test_gguf_int8_types_within_half_a_step(type_name):
    t = quantized_tensor(type_name)
    m = module_for_gguf_tensor(t)
    assert isinstance(m, Int8Linear)
    ref = t.to_torch()
    step = m.scales.float()[:, None]
    assert ((m.dequantize() - ref).abs() <= step / 2 * (1 + 1e-5)).all()
    assert rel_err(m.dequantize(), ref) < 0.01


def test_gguf_int4_type_with_odd_rows_goes_int8():
    t = quantized_tensor("Q4_0", rows=40)  # int4 packing wants rows in multiples of 16
    m = module_for_gguf_tensor(t)
    assert isinstance(m, Int8Linear)
    assert ((m.dequantize() - t.to_torch()).abs() <= m.scales.float()[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("type_name,dtype", [("F32", np.float32), ("F16", np.float16), ("BF16", None)])
def test_gguf_dense_types_give_plain_linear(type_name, dtype):
    w = torch.randn(N, K)  # GGUFReader hands out typed arrays for F32/F16, raw bytes for BF16
    data = w.bfloat16().view(torch.int16).numpy().view(np.uint8) if dtype is None else w.numpy().astype(dtype)
    t = GGUFTensor("t", type_name, (N, K), data)
    m = module_for_gguf_tensor(t, bias=torch.ones(N))
    assert type(m) is nn.Linear and torch.equal(m.weight, t.to_torch()) and torch.equal(m.bias, torch.ones(N))


@pytest.fixture(scope="module")
def smol():
    """(config, {HF name: GGUFTensor}) of the real SmolLM2 Q4_1 file, read once."""
    g = read_gguf(SMOL_GGUF)
    config = gguf_config(g)
    return config, gguf_tensors(g, config)


def test_gguf_real_file_rows(smol):
    """Rows of the real SmolLM2 file: Q4_1 projections (Q/K rows un-permuted) and the Q8_0 table."""
    _, ts = smol
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        t = ts[name]
        m = module_for_gguf_tensor(t)
        assert ((m.dequantize() - t.to_torch()).abs() <= int4_bound(m)).all(), name
    t = ts["model.embed_tokens.weight"]
    part = GGUFTensor(t.name, t.type_name, (1024, t.shape[1]), t.data[:1024])
    m = module_for_gguf_tensor(part)
    assert ((m.dequantize() - part.to_torch()).abs() <= m.scales.float()[:, None] / 2 * (1 + 1e-5)).all()


def build_on_meta(config: dict, weights: dict, repack: bool):
    """The loader's steps by hand: meta model, (repack), assign the remaining tensors as fp32."""
    with torch.device("meta"):
        model = build_model(config)
    if repack:
        repack_gguf_model(model, weights)
    model.load_state_dict({name: t.to_torch() for name, t in weights.items()}, strict=False, assign=True)
    if not repack:
        model.lm_head.weight = model.model.embed_tokens.weight  # tied
    return model.eval()


def test_gguf_model_repack_keeps_greedy_tokens(smol):
    """SmolLM2 Q4_1 (Q8_0 tied embedding) repacked: same greedy tokens as the fp32 dequantized model
    on a fixed sequence, with an Int8 LM head the embedding reads its rows from."""
    config, ts = smol
    ref = build_on_meta(config, dict(ts), repack=False)
    model = build_on_meta(config, dict(ts), repack=True)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.config.quantization["modules"]["model.embed_tokens"] == {"tied_to": "lm_head"}
    # "The capital of France is Paris. The capital of Italy is" in SmolLM2's tokenizer
    tokens = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 7158, 314]])
    with torch.no_grad():
        a, b = ref(tokens), model(tokens)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    assert a[0, -1].argmax() == b[0, -1].argmax()


# ---- state_dict round trips -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int4_g32_asym", "int4_g64_sym", "int8"])
def test_state_dict_round_trip_is_bit_exact(kind, tmp_path):
    m = make_module(kind, bias=True)
    state = m.state_dict()
    expected = {"qweight", "scales_and_zeros", "bias"} if kind != "int8" else {"qweight", "scales", "bias"}
    assert set(state) == expected
    save_file(state, tmp_path / "q.safetensors")
    if kind == "int8":
        fresh = Int8Linear(K, N, bias=True)
    else:
        fresh = Int4Linear(K, N, bias=True, group_size=m.group_size)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    assert torch.equal(fresh.dequantize(), m.dequantize())
    for name, buf in m.named_buffers():
        assert torch.equal(getattr(fresh, name), buf), name
    x = torch.randn(2, K)
    assert torch.equal(fresh(x), m(x))


def test_load_state_dict_reports_missing_qweight():
    m = make_module("int4_g32_asym")
    state = m.state_dict()
    del state["qweight"]
    with pytest.raises(RuntimeError, match="qweight"):
        Int4Linear(K, N, bias=False).load_state_dict(state)


# ---- embeddings and fusion ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int4_g32_asym", "int8"])
def test_quantized_embedding_reads_table_rows(kind):
    table = make_module(kind)
    emb = QuantizedEmbedding(table, tied=True)
    tokens = torch.tensor([[3, 79, 0], [64, 64, 17]])
    assert torch.equal(emb(tokens), table.dequantize()[tokens])
    assert emb.state_dict() == {}  # tied: the table is saved once, by its owner


@pytest.mark.skipif(not kernels.available(), reason="needs edgelm's kernels")
def test_kernel_row_lookup_equals_reference_rows():
    """lookup_rows (one C++ call) == dequantize_rows (torch ops) bit for bit: int4 blocks, and int8
    with rows in full 8-row tiles and in the row-major tail (N = 83); bad ids raise."""
    torch.manual_seed(0)
    tables = [make_module("int4_g32_asym"), Int8Linear.from_float(nn.Linear(K, 83, bias=False))]
    for table in tables:
        assert table.kernel_handle() is not None
        rows = torch.tensor([0, 7, 8, table.out_features - 1, 5, 5])
        assert torch.equal(table.lookup_rows(rows), table.dequantize_rows(rows))
        with pytest.raises(RuntimeError, match="out of range"):
            table.lookup_rows(torch.tensor([table.out_features]))


def test_quantized_embedding_from_float():
    e = nn.Embedding(50, 64)
    qe = QuantizedEmbedding.from_float(e)
    tokens = torch.tensor([1, 49, 7])
    assert rel_err(qe(tokens), e.weight[tokens].detach()) < 0.01
    assert set(qe.state_dict()) == {"table.qweight", "table.scales"}


@pytest.mark.parametrize("kind", ["int4_g32_asym", "int8"])
def test_fuse_quantized_concatenates_outputs(kind):
    parts = [make_module(kind, bias=True) for _ in range(3)]
    fused = fuse_quantized(parts)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert torch.equal(fused.bias, torch.cat([p.bias for p in parts]))


def test_fuse_quantized_refuses_mixed_kinds():
    assert fuse_quantized([make_module("int4_g32_asym"), make_module("int8")]) is None
    assert fuse_quantized([make_module("int4_g32_asym"), make_module("int4_g64_asym")]) is None


# ---- quantize_model on stories260K ----------------------------------------------------------


STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def stories_ref():
    """The fp32 model and a tokenized story (teacher-forced through both models)."""
    m = load(STORIES, dtype=torch.float32)
    return m, torch.tensor([m.tokenizer.encode(STORY)])


def greedy_agreement(model, ref, tokens) -> float:
    with torch.no_grad():
        return (model(tokens).argmax(-1) == ref(tokens).argmax(-1)).float().mean().item()


def test_default_predicate_names_the_incompatible_layer():
    m = load(STORIES, dtype=torch.float32)  # MLP hidden 172: not a multiple of 32 (nor of 16 rows)
    msg = r"model\.layers\.0\.mlp\.down_proj: .*in_features 172 \(weight \(64, 172\)\)"
    with pytest.raises(ValueError, match=msg):
        quantize_model(m, "int4", group_size=32)
    assert isinstance(m.lm_head, nn.Linear)  # nothing swapped before the error


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantize_stories_keeps_greedy_tokens(method, stories_ref, tmp_path):
    ref, tokens = stories_ref
    m = load(STORIES, dtype=torch.float32)
    quantize_model(m, method, group_size=32, predicate=lambda p, mod: can_quantize(mod, method, 32))
    assert isinstance(m.lm_head, (Int4Linear, Int8Linear))
    assert isinstance(m.model.embed_tokens, QuantizedEmbedding)  # tied: reads the quantized LM head
    q = m.config.quantization
    assert q["method"] == method and q["modules"]["model.embed_tokens"] == {"tied_to": "lm_head"}
    assert "model.layers.0.self_attn.qkv_proj" in q["modules"]
    assert greedy_agreement(m, ref, tokens) >= (0.85 if method == "int4" else 0.95)
    # save -> fresh model with the recorded layout -> bit-exact logits
    save_file(m.state_dict(), tmp_path / "m.safetensors")
    fresh = restore_quantized_layout(load(STORIES, dtype=torch.float32), q)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), m(tokens))


# ---- errors -----------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match=r"does not divide in_features 100 \(weight \(64, 100\)\)"):
        quantize_int4(torch.randn(64, 100), 32)
    with pytest.raises(ValueError, match=r"group_size must be one of .* got 48"):
        Int4Linear(96, 64, group_size=48)
    with pytest.raises(ValueError, match=r"out_features divisible by 16, got 40"):
        Int4Linear.from_float(nn.Linear(64, 40))
    with pytest.raises(ValueError, match=r"in_features divisible by 8, got 172"):
        Int8Linear.from_float(nn.Linear(172, 64))
    with pytest.raises(ValueError, match=r"3-bit weights are not supported \(weight \(64, 64\)\)"):
        quantize_weight(torch.randn(64, 64), bits=3)
    model = nn.Sequential(nn.Linear(64, 64))
    model.config = None
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        quantize_model(model, "int8", predicate=lambda path, m: False)
    with pytest.raises(ValueError, match="must be 2-D"):
        module_for_gguf_tensor(GGUFTensor("norm", "F32", (64,), np.zeros(64, np.float32)))
