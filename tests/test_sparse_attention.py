"""InfLLM v2 block-sparse attention, by contract (STYLE principle 9: selector + executor, each
checked against a plain reference):

- the vectorised selector == the per-query definition (kernels, group-summed softmax, max-pool,
  init/window blocks, causal top-k), for several GQA ratios and kernel geometries;
- the executor == dense attention with the selection as a boolean mask (<= 1e-4), prefill chunks
  and decode, GQA ratios 1/3/4/8/16, lengths that are not multiples of the block size, left padding;
- in a model: sparse == dense exactly below dense_len, and == dense when top-k covers every block;
  cached == uncached; incremental compressed keys == recomputed; trim / snapshot / restore;
- MiniCPM4 `sparse_config`, `set_sparse_attention`, config validation and parsing, the CLI flags;
- the eval helpers (pass-key prompt, perplexity) against direct computations.
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from edgelm import kernels
from edgelm.cache import KVCache
from edgelm.layers.attention import CAUSAL, ForwardContext, attend, attend_reference
from edgelm.layers.sparse_attention import (
    SparseAttention,
    SparseConfig,
    SparseKVCache,
    compress_keys,
    select_blocks,
    select_blocks_reference,
    selection_mask,
    sparse_attend,
    sparse_attention_reference,
)
from edgelm.models import build_model

ATOL = 1e-4
# Small geometry with the MiniCPM4 ratios (kernel = block / 2, stride = block / 4): blocks of 16.
CFG = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, window_size=24, topk=3, dense_len=0, query_chunk=32
)
VOCAB = 97
TINY = dict(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,  # G = 3, head_dim 8
    max_position_embeddings=512,
)
# MiniCPM4's config.json block, scaled down (keys as shipped, including use_nope).
MINICPM4_SPARSE = dict(
    kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=32, topk=2, use_nope=False,
    dense_len=64,
)
SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES_BIN = SHARED / "models" / "stories260K" / "stories260K.bin"


pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(G: int, S: int, B: int = 2, Hkv: int = 2, D: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, S, D, generator=g)
    return q, torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --- selector -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        dataclasses.replace(CFG, kernel_size=4),  # kernel == stride: pool kernel 4, padding 0
        dataclasses.replace(CFG, kernel_size=12, init_blocks=2, window_size=1, topk=2),  # padding 2
    ],
    ids=["minicpm-ratios", "kernel-eq-stride", "wide-kernel"],
)
@pytest.mark.parametrize("G", [1, 3, 4])
def test_selector_matches_per_query_definition(cfg, G):
    q, k, _ = qkv(G, 117)  # 117 = 7 blocks + 5
    pos = torch.arange(117)
    got = select_blocks(q, compress_keys(k, cfg.kernel_size, cfg.kernel_stride), pos, cfg, 0.3)
    assert torch.equal(got, select_blocks_reference(q, k, pos, cfg, 0.3))
    last = got[:, :, -1]  # the last query: init + window + top-k, never everything
    assert last[..., : cfg.init_blocks].all() and last[..., -1].all() and not last.all()


def test_selection_is_shared_by_a_gqa_group_and_differs_across_groups():
    q, k, _ = qkv(4, 160, B=1, Hkv=2, seed=3)
    sel = select_blocks(q, compress_keys(k, 8, 4), torch.arange(160), CFG, 0.3)
    assert sel.shape == (1, 2, 160, 10)
    assert not torch.equal(sel[:, 0], sel[:, 1])
    counts = sel.sum(-1)  # per query: forced blocks + min(topk, the rest)
    assert torch.equal(counts[:, 0], counts[:, 1])


# --- executor vs dense attention with the selection mask ------------------------------------


def masked_reference(q, k, v, pos, cfg=CFG, scale=0.3, left_pad=None):
    sel = select_blocks(q, compress_keys(k, cfg.kernel_size, cfg.kernel_stride), pos, cfg, scale)
    if left_pad is None:
        return sparse_attention_reference(q, k, v, sel, pos, cfg.block_size, scale)
    return sparse_attention_reference_padded(q, k, v, sel, pos, cfg, scale, left_pad)


def sparse_attention_reference_padded(q, k, v, sel, pos, cfg, scale, left_pad):
    mask = selection_mask(sel, pos, k.shape[2], cfg.block_size)  # (B, Hkv, C, S)
    key, query, lp = torch.arange(k.shape[2]), pos[:, None], left_pad[:, None, None, None]
    mask = (mask & (key >= lp)) | ((key == query) & (query < lp))
    return attend_reference(q, k, v, mask.repeat_interleave(q.shape[1] // k.shape[1], 1), scale)


def run_layer(q, k, v, offset: int, cfg=CFG, left_pad=None, cache=None):
    """SparseAttention as Attention calls it: queries at [offset, offset + L), keys from 0."""
    tokens = torch.zeros(q.shape[0], q.shape[2], dtype=torch.long)
    ctx = ForwardContext.make(tokens, offset, left_pad)
    return SparseAttention(cfg)(q, k, v, cache, ctx, 0.3)


@pytest.fixture(params=["cpp", "python"])
def executor(request, monkeypatch):
    """SparseAttention's two executors: the C++ kernel (one call per layer) and the chunked Python
    one it falls back to (no compiler, bf16, left padding, autograd)."""
    if request.param == "python":
        monkeypatch.setenv("EDGELM_KERNELS", "0")
    else:
        assert kernels.ext() is not None, "the C++ kernels did not build"
    return request.param


@pytest.mark.parametrize("G", [1, 3, 4, 8, 16])
def test_executor_prefill_matches_masked_dense(G, executor):
    q, k, v = qkv(G, 157)  # several query chunks of 32, last block partial
    pos = torch.arange(157)
    close(run_layer(q, k, v, 0), masked_reference(q, k, v, pos))
    # a later prefill chunk: 45 new queries over 157 cached keys
    close(run_layer(q[:, :, 112:], k, v, 112), masked_reference(q[:, :, 112:], k, v, pos[112:]))


@pytest.mark.parametrize("G", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("S", [97, 160, 161, 175])  # own block partial, full, 1 token, last-but-one
def test_executor_decode_matches_masked_dense(G, S):
    q, k, v = qkv(G, S, seed=S)
    pos = torch.tensor([S - 1])
    kernels = compress_keys(k, CFG.kernel_size, CFG.kernel_stride)
    got = sparse_attend(q[:, :, -1:], k, v, kernels, pos, CFG, 0.3)
    close(got, masked_reference(q[:, :, -1:], k, v, pos))


@pytest.mark.parametrize("D", [64, 128, 24])  # the register-tiled head sizes, and any other
@pytest.mark.parametrize("G", [1, 3, 8])
def test_cpp_executor_matches_masked_dense(G, D):
    q, k, v = qkv(G, 157, D=D, seed=G + D)
    pos, kern = torch.arange(157), compress_keys(k, CFG.kernel_size, CFG.kernel_stride)
    for cfg in (CFG, dataclasses.replace(CFG, dense_len=100)):  # all sparse; dense below 100
        got = kernels.ext().sparse_attention(q[:, :, 40:], k, v, kern, 40, cfg.kernel_args(), 0.3)
        d = max(0, cfg.dense_len - 1 - 40)  # the first d queries have t + 1 < dense_len: dense
        want = masked_reference(q[:, :, 40 + d :], k, v, pos[40 + d :], cfg)
        if d:
            dense = attend_reference(q[:, :, 40 : 40 + d], k[:, :, : 40 + d], v[:, :, : 40 + d], CAUSAL, 0.3)
            want = torch.cat([dense, want], 2)
        close(got, want)


@pytest.mark.parametrize("L", [1, 40])
def test_executor_masks_left_padding(L):
    q, k, v = qkv(3, 130, seed=5)
    left_pad = torch.tensor([0, 7])
    pos = torch.arange(130 - L, 130)
    got = run_layer(q[:, :, -L:], k, v, 130 - L, left_pad=left_pad)
    close(got, masked_reference(q[:, :, -L:], k, v, pos, left_pad=left_pad))


def test_dense_prefix_of_a_mixed_call_is_dense():
    q, k, v = qkv(3, 150)
    cfg = dataclasses.replace(CFG, dense_len=100)
    out = run_layer(q, k, v, 0, cfg)
    expected = attend(q[:, :, :99], k[:, :, :99], v[:, :, :99], "causal", 0.3)
    close(out[:, :, :99], expected, atol=1e-5)
    assert (out[:, :, 99:] - attend(q, k, v, "causal", 0.3)[:, :, 99:]).abs().max() > 1e-2


# --- in a model ----------------------------------------------------------------------------


def tiny_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(dict(TINY, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5 if p.dim() == 2 else 0.1)
    return model.eval()


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def run_chunks(model, toks, sizes, cache=None):
    cache = model.make_cache() if cache is None else cache
    out, i = [], 0
    for n in sizes:
        out.append(model(toks[:, i : i + n], cache))
        i += n
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_sparse_equals_dense_exactly_below_dense_len():
    model, toks = tiny_model(), tokens(200)
    dense = model(toks)
    model.set_sparse_attention(dataclasses.replace(CFG, dense_len=201))
    assert torch.equal(model(toks), dense)
    sparse = run_chunks(model, toks, [150] + [1] * 50)
    assert torch.equal(sparse, run_chunks(model.set_sparse_attention(None), toks, [150] + [1] * 50))


@torch.no_grad()
def test_sparse_equals_dense_when_topk_covers_every_block():
    model, toks = tiny_model(), tokens(200)
    dense = model(toks)
    model.set_sparse_attention(dataclasses.replace(CFG, topk=13))  # 200 tokens = 13 blocks
    close(model(toks), dense, atol=1e-5)
    close(run_chunks(model, toks, [37] * 5 + [1] * 15), dense, atol=1e-5)
    model.set_sparse_attention(CFG)
    assert (model(toks) - dense)[:, 40:].abs().max() > 1e-2  # with topk 3 it is really sparse


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[50] + [1] * 150, [37] * 5 + [15]], ids=["prefill+decode", "chunks-of-37"])
def test_sparse_cached_matches_uncached(sizes):
    model, toks = tiny_model(), tokens(200)
    model.set_sparse_attention(dataclasses.replace(CFG, dense_len=70))
    close(run_chunks(model, toks, sizes), model(toks))


@torch.no_grad()
def test_incremental_compressed_keys_match_recomputed():
    model, toks = tiny_model(), tokens(180)
    model.set_sparse_attention(CFG)
    cache = model.make_cache()
    plain = [KVCache() for _ in cache]  # no side cache: kernels recomputed from all keys each call
    assert all(isinstance(c, SparseKVCache) for c in cache)
    i = 0
    for n in [5, 30, 1, 1, 1, 13, 16] + [1] * 20 + [93]:
        close(model(toks[:, i : i + n], cache), model(toks[:, i : i + n], plain), atol=1e-5)
        i += n
        for c in cache:
            assert c.num_kernels == max(0, (i - 8) // 4 + 1)
            close(c.compressed_keys(), compress_keys(c.keys[:, :, :i], 8, 4), atol=1e-6)
            # the kernel buffer grows with the KV buffers: room for their capacity's kernels, no more
            assert c.kernels is None or c.kernels.shape[2] == max(c.num_kernels, (c.keys.shape[2] - 8) // 4 + 1)


@torch.no_grad()
def test_trim_drops_kernels_and_refeed_is_exact():
    model = tiny_model().set_sparse_attention(CFG)
    toks, other = tokens(120), tokens(17, seed=9)
    cache = model.make_cache()
    first = model(toks, cache)
    assert [c.trim(17) for c in cache] == [17, 17]
    assert {c.num_kernels for c in cache} == {(103 - 8) // 4 + 1}
    close(run_chunks(model, toks[:, 103:], [1] * 17, cache), first[:, 103:])
    for c in cache:
        c.trim(17)
    expected = model(torch.cat([toks[:, :103], other], dim=1))[:, 103:]
    close(run_chunks(model, other, [4, 1, 12], cache), expected)


@torch.no_grad()
def test_snapshot_restore_round_trip():
    model = tiny_model().set_sparse_attention(CFG)
    prefix, a, b = tokens(90, 1), tokens(30, 2), tokens(30, 3)
    cache = model.make_cache()
    model(prefix, cache)
    states = [c.snapshot() for c in cache]
    out_a = run_chunks(model, a, [10, 1, 19], cache)
    for c, s in zip(cache, states):
        c.restore(s)
    assert {c.offset for c in cache} == {90} and {c.num_kernels for c in cache} == {(90 - 8) // 4 + 1}
    close(model(b, cache), model(torch.cat([prefix, b], dim=1))[:, 90:])
    for c, s in zip(cache, states):
        c.restore(s)
    close(run_chunks(model, a, [3] * 10, cache), out_a)
    assert all(c.nbytes > c.keys.nbytes + c.values.nbytes for c in cache)  # kernels counted


@torch.no_grad()
def test_minicpm4_sparse_config():
    base = dict(TINY, model_type="minicpm", scale_emb=12.0, scale_depth=1.4, dim_model_base=16)
    sparse, dense = tiny_model(**base, sparse_config=MINICPM4_SPARSE), tiny_model(**base)
    dense.load_state_dict(sparse.state_dict())
    expected = SparseConfig(
        block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=2, dense_len=64
    )
    assert all(layer.self_attn.sparse.config == expected for layer in sparse.layers)
    assert all(layer.self_attn.sparse is None for layer in dense.layers)
    toks = tokens(160)
    out = sparse(toks)
    # dense_len 64: the first 63 queries are dense (to fp32 rounding: 63 rows of LM head run edgelm's
    # few-rows kernel, 160 run MKL's GEMM)
    close(out[:, :63], dense(toks[:, :63]), atol=1e-5)
    assert (out - dense(toks))[:, 63:].abs().max() > 1e-2
    close(run_chunks(sparse, toks, [70] + [1] * 90), out)
    with pytest.raises(ValueError, match="use_nope"):
        tiny_model(**base, sparse_config=dict(MINICPM4_SPARSE, use_nope=True))
    with pytest.raises(ValueError, match="kernel_stride"):
        tiny_model(**base, sparse_config=dict(MINICPM4_SPARSE, kernel_stride=3))


def test_sliding_window_layers_stay_dense():
    model = tiny_model(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    model.set_sparse_attention(CFG)
    assert [layer.self_attn.sparse is not None for layer in model.layers] == [True, False]
    assert [type(c).__name__ for c in model.make_cache()] == ["SparseKVCache", "SlidingWindowKVCache"]


# --- configuration --------------------------------------------------------------------------


def test_defaults_are_minicpm4s():
    cfg = SparseConfig()
    assert (cfg.block_size, cfg.kernel_size, cfg.kernel_stride, cfg.init_blocks) == (64, 32, 16, 1)
    assert (cfg.window_size, cfg.topk, cfg.dense_len) == (2048, 64, 8192)
    assert (cfg.pool_kernel, cfg.pool_stride, cfg.pool_padding) == (5, 4, 1)


def test_parse_cli_string():
    cfg = SparseConfig.parse("block=64,topk=16,window=512,dense_len=1024")
    assert cfg == SparseConfig(topk=16, window_size=512, dense_len=1024)
    assert SparseConfig.parse("kernel_size=64, stride=32 ,init=2") == SparseConfig(
        kernel_size=64, kernel_stride=32, init_blocks=2
    )
    assert SparseConfig.parse("default") == SparseConfig()
    with pytest.raises(ValueError, match="bad sparse attention setting 'blocks=64'"):
        SparseConfig.parse("blocks=64")
    with pytest.raises(ValueError, match="topk='many'"):
        SparseConfig.parse("topk=many")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kernel_stride=24), "kernel_stride"),  # does not divide 64
        (dict(kernel_size=40), "kernel_size"),  # not a multiple of 16
        (dict(topk=0), "topk"),
        (dict(block_size=0), "block_size"),
        (dict(window_size=0), "window_size"),
        (dict(init_blocks=-1), "init_blocks"),
        (dict(dense_len=-5), "dense_len"),
        (dict(query_chunk=0), "query_chunk"),
        (dict(topk=2.5), "topk"),
        (dict(window_size="512"), "window_size"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"sparse attention {field}="):
        SparseConfig(**kwargs)


def test_softcapped_attention_is_refused():
    model = tiny_model()
    model.layers[0].self_attn.softcap = 30.0
    with pytest.raises(ValueError, match="soft-capping"):
        model.set_sparse_attention(CFG)


# --- CLI and evals --------------------------------------------------------------------------


def test_cli_sparse_flags_parse():
    from edgelm.cli import build_parser, sparse_config_from_args

    spec = "block=16,kernel=8,stride=4,topk=2,window=32,dense_len=64"
    for argv in (
        ["generate", "--prompt", "hi", "--sparse-attention", spec],
        ["bench", "--sparse-attention", spec],
        ["eval", "passkey", "--lengths", "512", "--sparse", spec],
        ["eval", "ppl", "--text", "x.txt", "--ctx", "256", "--sparse", spec],
    ):
        args = build_parser().parse_args(argv)
        assert sparse_config_from_args(args) == SparseConfig.parse(spec)
    assert sparse_config_from_args(build_parser().parse_args(["generate", "--prompt", "hi"])) is None


def test_eval_ppl_cli_runs_sparse(capsys, tmp_path):
    from edgelm.cli import main

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little dog who liked to run in the park. " * 60)
    spec = "block=16,kernel=8,stride=4,topk=1,window=16,dense_len=32"
    argv = ["eval", "ppl", "--model", str(STORIES_BIN), "--dtype", "float32", "--threads", "1",
            "--text", str(text), "--ctx", "96", "--max-windows", "2", "--json", "--sparse", spec]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 96 and out["windows"] == 2 and 1 < out["ppl"] < 512


@torch.no_grad()
def test_perplexity_matches_direct_cross_entropy():
    from edgelm.eval.ppl import perplexity

    model, toks = tiny_model(), tokens(150)
    logits = model(toks)[0]
    # windows [0, 100) and [50, 150), each scoring its last 50 tokens = positions 50..149
    nll = torch.nn.functional.cross_entropy(logits[49:99], toks[0, 50:100], reduction="sum")
    window2 = model(toks[:, 50:150])[0]
    nll += torch.nn.functional.cross_entropy(window2[49:99], toks[0, 100:150], reduction="sum")
    result = perplexity(model, toks[0], ctx=100, stride=50, chunk=32)
    assert result.tokens == 100 and result.windows == 2
    assert math.isclose(result.nll, float(nll) / 100, rel_tol=1e-5)


def test_passkey_prompt_places_the_key():
    from edgelm.eval.passkey import answer_digits, passkey_prompt
    from edgelm.loader import load

    tok = load(STORIES_BIN, dtype=torch.float32).tokenizer
    where = []
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_prompt(tok, 600, depth, "52817")
        text = tok.decode(ids)
        assert 500 < len(ids) <= 600 and text.count("52817") == 2
        where.append(text.index("52817") - text.index("irrelevant text"))
        assert text.endswith("What is the pass key? The pass key is")
    middle = (where[1] - where[0]) / (where[2] - where[0])
    assert where[0] < 200 and abs(middle - 0.5) < 0.05  # just after the intro, middle, end
    assert answer_digits(" 52817. The") == "52817" and answer_digits("no digits") == ""
