"""Model contracts, each on tiny random configs (hidden 64, 2-3 layers, vocab 160):

- parity: edgelm logits == transformers logits on the same weights (fp32, batch 2, >= 64 tokens);
- cached decoding (prefill + one token at a time, or chunks of 7) == one uncached forward;
- a left-padded batch == each prompt run alone, through prefill and a few decode steps;
- the cache protocol: trim, snapshot/restore, nbytes, bounded sliding-window memory;
- config errors name what is wrong.
"""

import functools
import math

import pytest
import torch
import transformers

from edgelm.cache import KVCache, SlidingWindowKVCache
from edgelm.loader import assign_weights
from edgelm.models import build_model

transformers.logging.set_verbosity_error()

VOCAB = 160
PARITY_ATOL = 1e-3
CACHE_ATOL = 1e-4

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # head_dim 16
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
# LongRoPE factors, one per rotary frequency (head_dim / 2 = 8); long set beyond 80 positions.
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 80,
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 12.0],
}
GEMMA3 = dict(
    BASE,
    num_hidden_layers=3,
    head_dim=16,
    sliding_window=12,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    query_pre_attn_scalar=24,
    tie_word_embeddings=True,
)
GRANITE = dict(
    BASE, embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.05, logits_scaling=3.0
)
MINICPM = dict(BASE, scale_emb=12.0, scale_depth=1.4, dim_model_base=16)


def minicpm_as_granite(cfg: dict) -> dict:
    """The Granite config that computes what a MiniCPM config does (MiniCPM is not in transformers)."""
    out = {k: v for k, v in cfg.items() if k not in ("scale_emb", "scale_depth", "dim_model_base")}
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return dict(
        out,
        embedding_multiplier=cfg["scale_emb"],
        residual_multiplier=cfg["scale_depth"] / math.sqrt(cfg["num_hidden_layers"]),
        logits_scaling=cfg["hidden_size"] / cfg["dim_model_base"],
        attention_multiplier=head_dim**-0.5,
    )


# name -> (edgelm model_type, config, sequence length). The transformers reference is the same
# model_type, except minicpm (compared against Granite) and gemma3_text.
CASES = {
    "llama-mha": ("llama", dict(BASE, num_key_value_heads=4), 64),
    "llama-mha-tied": ("llama", dict(BASE, num_key_value_heads=4, tie_word_embeddings=True), 64),
    "llama-gqa": ("llama", BASE, 64),
    "llama-gqa-tied": ("llama", dict(BASE, tie_word_embeddings=True), 64),
    "llama-mqa": ("llama", dict(BASE, num_key_value_heads=1), 64),
    "llama-mqa-tied": ("llama", dict(BASE, num_key_value_heads=1, tie_word_embeddings=True), 64),
    "llama-bias": ("llama", dict(BASE, attention_bias=True, mlp_bias=True), 64),
    "rope-linear": (
        "llama",
        dict(BASE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        64,
    ),
    "rope-llama3": (
        "llama",
        dict(
            BASE,
            # with head_dim 16 and 64 original positions, frequencies fall in all three bands
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        80,
    ),
    "rope-yarn": (
        "llama",
        dict(
            BASE,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        80,
    ),
    "rope-yarn-mscale": (
        "llama",
        dict(
            BASE,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "truncate": False,
            },
        ),
        80,
    ),
    # 64 < 80 original positions: short factors; 96 > 80: long factors (decided per call).
    "rope-longrope-short": ("llama", dict(BASE, max_position_embeddings=320, rope_parameters=LONGROPE), 64),
    "rope-longrope-long": ("llama", dict(BASE, max_position_embeddings=320, rope_parameters=LONGROPE), 96),
    "mistral-sliding": ("mistral", dict(BASE, sliding_window=16), 64),
    "qwen2-bias": ("qwen2", dict(BASE, tie_word_embeddings=True), 64),
    "qwen3-qknorm": ("qwen3", dict(BASE, head_dim=32), 64),  # H * head_dim != hidden
    "granite": ("granite", GRANITE, 64),
    "minicpm": ("minicpm", MINICPM, 64),
    "gemma3-sliding": ("gemma3_text", GEMMA3, 64),
    "gemma3-softcap": ("gemma3_text", dict(GEMMA3, final_logit_softcapping=2.0), 64),
    # (No attn_logit_softcapping: transformers' Gemma 3 accepts it but never applies it.)
    "gemma3-softcap-rope": (
        "gemma3_text",
        dict(
            GEMMA3,
            final_logit_softcapping=2.0,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
            },
        ),
        64,
    ),
}


# Qwen2 windows only the layers >= max_window_layers (its layer_types), not every layer.
CASES_LAYER_TYPES = {
    "qwen2-sliding-layer-types": (
        "qwen2",
        dict(BASE, use_sliding_window=True, sliding_window=16, max_window_layers=1),
        64,
    ),
}
CASES = CASES | CASES_LAYER_TYPES
ALL_CASES = CASES


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(model: torch.nn.Module) -> None:
    """Weights with O(1) activations; norm weights random and non-zero (Gemma's start at 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)  # biases
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)


@functools.cache
def models(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers reference, edgelm model) sharing one set of random weights."""
    model_type, cfg, _ = ALL_CASES[name]
    ref_type, ref_cfg = ("granite", minicpm_as_granite(cfg)) if model_type == "minicpm" else (model_type, cfg)
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(ref_type, **ref_cfg)
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    randomize_(ref)
    config = dict(cfg, model_type=model_type) if model_type == "minicpm" else hf_config.to_dict()
    with torch.device("meta"):
        model = build_model(config)
    # What the real loader does: checks every name and shape, re-ties embeddings.
    assign_weights(model, dict(ref.state_dict()), torch.float32)
    return ref, model.eval()


def tokens_for(name: str, batch: int = 2, length: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length or ALL_CASES[name][2]), generator=g)


def run_chunks(model, tokens: torch.Tensor, sizes: list[int], cache=None) -> torch.Tensor:
    """Feed `tokens` (B, L) through one cache in chunks of `sizes` -> logits (B, L, V)."""
    cache = model.make_cache() if cache is None else cache
    out, i = [], 0
    for n in sizes:
        out.append(model(tokens[:, i : i + n], cache))
        i += n
    assert i == tokens.shape[1]
    return torch.cat(out, dim=1)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = CACHE_ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --- parity with transformers ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_matches_transformers(name):
    ref, model = models(name)
    tokens = tokens_for(name)
    expected = ref(tokens).logits
    got = model(tokens)
    assert got.shape == (2, tokens.shape[1], VOCAB) and got.dtype == torch.float32
    assert expected.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    close(got, expected, atol=PARITY_ATOL)


# --- cached == uncached ---------------------------------------------------------------------


def sevens(n: int) -> list[int]:
    return [7] * (n // 7) + ([n % 7] if n % 7 else [])


def cached_schedules(name: str) -> list[list[int]]:
    """Chunk sizes: a prefill then one token at a time; chunks of 7."""
    L = CASES[name][2]
    # LongRoPE picks its factors from the largest position in each call (as transformers does), so
    # a cached run matches one uncached call only if its first call already passes the original length.
    first = 84 if name == "rope-longrope-long" else 0
    prefill = max(first, 16)
    return [[prefill] + [1] * (L - prefill), ([first] if first else []) + sevens(L - first)]


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_cached_decoding_matches_uncached(name):
    _, model = models(name)
    tokens = tokens_for(name)
    full = model(tokens)
    for sizes in cached_schedules(name):
        close(run_chunks(model, tokens, sizes), full)


@torch.no_grad()
def test_longrope_cached_crossing_original_length_matches_transformers_cache():
    """Crossing original_max_position_embeddings mid-decode, earlier keys keep their short-factor
    rotation: cached != uncached, in transformers too. edgelm follows transformers' cached path."""
    ref, model = models("rope-longrope-long")
    tokens = tokens_for("rope-longrope-long")
    sizes = [7] * 13 + [5]  # the first 11 calls end below position 80
    got = run_chunks(model, tokens, sizes)
    cache, expected, i = transformers.DynamicCache(config=ref.config), [], 0
    for n in sizes:
        expected.append(ref(tokens[:, i : i + n], past_key_values=cache, use_cache=True).logits)
        i += n
    close(got, torch.cat(expected, dim=1), atol=PARITY_ATOL)
    assert (got - model(tokens)).abs().max() > 1e-2  # and it really differs from one uncached call


# --- left-padded batch == singles -----------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding", "gemma3-sliding", "qwen3-qknorm"])
@torch.no_grad()
def test_left_padded_batch_matches_singles(name):
    _, model = models(name)
    lengths, steps = (30, 19), 4
    pad = [max(lengths) - n for n in lengths]
    prompts = [tokens_for(name, 1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    filler = tokens_for(name, 1, max(pad), seed=99)[0]  # padding ignored whatever its tokens
    batch = torch.stack([torch.cat([filler[:p], t]) for p, t in zip(pad, prompts)])
    follow = tokens_for(name, 2, steps, seed=7)  # (B, steps) decode inputs

    cache = model.make_cache(left_pad=pad)
    batch_prefill = model(batch, cache)
    close(model(batch, left_pad=pad), batch_prefill)  # no explicit cache: same result
    batch_steps = [model(follow[:, s : s + 1], cache) for s in range(steps)]

    for b, (p, prompt) in enumerate(zip(pad, prompts)):
        single_cache = model.make_cache()
        close(batch_prefill[b, p:], model(prompt[None], single_cache)[0])
        for s in range(steps):
            close(batch_steps[s][b], model(follow[b : b + 1, s : s + 1], single_cache)[0])


# --- cache protocol -------------------------------------------------------------------------

PROTOCOL_CASES = ["llama-gqa", "mistral-sliding", "gemma3-sliding"]


def offsets(cache) -> set[int]:
    return {c.offset for c in cache}


@pytest.mark.parametrize("name", PROTOCOL_CASES)
@torch.no_grad()
def test_trim_then_refeed(name):
    _, model = models(name)
    tokens = tokens_for(name, length=40)
    other = tokens_for(name, length=10, seed=5)
    cache = model.make_cache()
    first = model(tokens, cache)
    assert [c.trim(10) for c in cache] == [10] * len(cache) and offsets(cache) == {30}
    close(model(tokens[:, 30:], cache), first[:, 30:])
    for c in cache:
        c.trim(10)
    expected = model(torch.cat([tokens[:, :30], other], dim=1))[:, 30:]
    close(model(other, cache), expected)


@pytest.mark.parametrize("name", PROTOCOL_CASES)
@torch.no_grad()
def test_snapshot_restore_round_trip(name):
    _, model = models(name)
    prefix, a, b = (tokens_for(name, length=n, seed=s) for n, s in ((30, 1), (10, 2), (10, 3)))
    cache = model.make_cache()
    model(prefix, cache)
    states = [c.snapshot() for c in cache]
    out_a = run_chunks(model, a, [4, 1, 5], cache)
    for c, s in zip(cache, states):
        c.restore(s)
    assert offsets(cache) == {30}
    close(model(b, cache), model(torch.cat([prefix, b], dim=1))[:, 30:])
    for c, s in zip(cache, states):
        c.restore(s)
    close(model(a, cache), out_a)


@pytest.mark.parametrize("name", PROTOCOL_CASES)
@torch.no_grad()
def test_nbytes_positive_and_growing(name):
    _, model = models(name)
    cache = model.make_cache()
    assert sum(c.nbytes for c in cache) == 0
    model(tokens_for(name, length=10), cache)
    short = sum(c.nbytes for c in cache)
    assert short > 0 and all(c.nbytes > 0 for c in cache)
    model(tokens_for(name, length=290, seed=2), cache)
    assert sum(c.nbytes for c in cache) > short




@torch.no_grad()
def test_sliding_window_cache_is_bounded_and_exact_on_long_sequences():
    """Window 8 over 1,500 tokens: the cache compacts (copies to the front) several times, stays
    at a fixed size far below a full cache's, and still gives the uncached logits."""
    torch.manual_seed(0)
    model = build_model(dict(BASE, model_type="mistral", sliding_window=8, max_position_embeddings=2048))
    randomize_(model)
    model.eval()
    L, chunk, tail = 1500, 50, 20
    tokens = torch.randint(0, VOCAB, (1, L))
    cache = model.make_cache()
    assert all(isinstance(c, SlidingWindowKVCache) for c in cache)
    full_cache = [KVCache() for _ in cache]  # same model, nothing ever dropped
    sizes = [chunk] * ((L - tail) // chunk) + [1] * tail
    sizes[-tail - 1] += (L - tail) % chunk
    got, nbytes, i = [], [], 0
    for n in sizes:
        got.append(model(tokens[:, i : i + n], cache))
        close(model(tokens[:, i : i + n], full_cache), got[-1])
        nbytes.append(sum(c.nbytes for c in cache))
        i += n
    close(torch.cat(got, dim=1), model(tokens))
    assert max(c.start for c in cache) > 0  # it did compact
    assert max(nbytes) == max(nbytes[: len(nbytes) // 3])  # bounded: no growth after ~500 tokens
    # window + slack (256) rounded up to the 256-step: 512 positions against the full 1,536
    assert nbytes[-1] <= 0.35 * sum(c.nbytes for c in full_cache)
    with pytest.raises(ValueError, match="snapshot/restore"):
        cache[0].trim(600)  # those keys are gone
    for c in cache:
        assert c.trim(200) == 200  # within the slack kept for speculative rollback
    close(run_chunks(model, tokens[:, -200:], [100, 1, 99], cache), torch.cat(got, dim=1)[:, -200:])


@torch.no_grad()
def test_sliding_window_snapshot_restore_across_compaction():
    _, model = models("mistral-sliding")
    prefix, more = tokens_for("mistral-sliding", 1, 300), tokens_for("mistral-sliding", 1, 320, seed=2)
    cache = model.make_cache()
    model(prefix, cache)
    states = [c.snapshot() for c in cache]
    first = run_chunks(model, more, [64] * 5, cache)
    assert max(c.start for c in cache) > 0  # compacted after the snapshot
    for c, s in zip(cache, states):
        c.restore(s)
    close(run_chunks(model, more, [64] * 5, cache), first)


# --- bad configs ----------------------------------------------------------------------------


def test_unknown_model_type_is_named():
    with pytest.raises(ValueError, match="nope"):
        build_model({"model_type": "nope"})


def test_gemma3_layer_types_of_wrong_length():
    cfg = dict(GEMMA3, model_type="gemma3_text", layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match="layer_types"):
        build_model(cfg)
