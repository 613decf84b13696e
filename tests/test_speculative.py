"""Speculative decoding: greedy output identical to plain decoding for every proposer, sampled
output distributed as the target's (chi-square), FR-Spec files, cache rollback, bad input."""

import argparse
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgelm import load
from edgelm.cache import KVCache
from edgelm.generate import generate_step
from edgelm.models import build_model
from edgelm.sampling import make_repetition_penalty
from edgelm.speculative import (
    Draft,
    DraftModelProposer,
    LayerSkipProposer,
    NgramProposer,
    SamplingParams,
    SpeculativeStats,
    build_frequency_ranking,
    load_frequency_ranking,
    save_frequency_ranking,
    speculative_generate_step,
)
from edgelm.speculative.cli import add_frspec_parser, add_speculative_args, cmd_frspec, step_fn_from_args
from edgelm.speculative.frspec import build_frequency_file, pick_size, restrict_lm_head
from edgelm.speculative.generate import DraftLength

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"
SMOL = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = SHARED / "data" / "python-library-docs.txt"
CODE_PROMPT = (
    'import numpy as np\n\n\ndef moving_average(values, window):\n    """Return the moving average."""\n'
)


# ---------------------------------------------------------------- helpers


def greedy(model, ids, n: int, **kwargs) -> list[int]:
    return [t for t, _ in generate_step(model, ids, max_tokens=n, **kwargs)]


def speculate(model, ids, proposer, n: int, **kwargs) -> tuple[list[int], SpeculativeStats]:
    stats = SpeculativeStats()
    out = [t for t, _ in speculative_generate_step(model, ids, proposer, max_tokens=n, stats=stats, **kwargs)]
    return out, stats


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories():
    return load(STORIES, dtype=torch.float32)


@pytest.fixture(scope="module")
def stories_draft():
    return load(STORIES, dtype=torch.float32)  # a second load: a separate draft model


@pytest.fixture(scope="module")
def stories_fr(stories):
    return build_frequency_ranking(stories.tokenizer, TEXT, [64, 512], max_lines=3000)


@pytest.fixture(scope="module")
def smol():
    return load(SMOL, dtype=torch.float32, dequantize=True)  # the fp32 reference path


@pytest.fixture(scope="module")
def smol_fr(smol):
    return build_frequency_ranking(smol.tokenizer, TEXT, [8192], max_lines=3000)


# ---------------------------------------------------------------- greedy == plain decoding

STORIES_PROPOSERS = {
    "ngram": lambda m, d, fr: NgramProposer(n_max=3),
    "draft": lambda m, d, fr: DraftModelProposer(d),
    "layerskip": lambda m, d, fr: LayerSkipProposer(m, 3),
    "frspec-draft": lambda m, d, fr: DraftModelProposer(d, frspec_ids=fr[64]),
    "frspec-layerskip": lambda m, d, fr: LayerSkipProposer(m, 2, frspec_ids=fr[64]),
    "tree-draft": lambda m, d, fr: DraftModelProposer(d, branches=(3, 2)),
    "dynamic-tree-layerskip": lambda m, d, fr: LayerSkipProposer(m, 2, branches=(2, 2, 2, 2), confident=0.6),
    "tree-frspec-layerskip": lambda m, d, fr: LayerSkipProposer(m, 2, frspec_ids=fr[64], branches=(2, 2, 2)),
    "ngram-trie": lambda m, d, fr: NgramProposer(n_max=3, branches=4),
}
STORIES_PROMPTS = ["Once upon a time", "Tom had a red ball. Tom had a red ball. Tom had a red"]


@pytest.mark.parametrize("name", STORIES_PROPOSERS)
@pytest.mark.parametrize("prompt", STORIES_PROMPTS)
def test_stories_greedy_identical(stories, stories_draft, stories_fr, name, prompt):
    ids = stories.tokenizer.encode(prompt)
    ref = greedy(stories, ids, 128)
    for num_draft, adaptive in ((4, True), (6, False)):
        proposer = STORIES_PROPOSERS[name](stories, stories_draft, stories_fr)
        out, stats = speculate(stories, ids, proposer, 128, num_draft=num_draft, adaptive=adaptive)
        assert out == ref, (name, num_draft, adaptive)
        assert stats.num_tokens == 128 and stats.num_accepted <= stats.num_proposed


def test_draft_equal_to_target_accepts_everything(stories, stories_draft):
    ids = stories.tokenizer.encode("Once upon a time")
    out, stats = speculate(stories, ids, DraftModelProposer(stories_draft), 128, num_draft=4, adaptive=False)
    assert out == greedy(stories, ids, 128)
    assert stats.num_proposed > 100 and stats.num_accepted == stats.num_proposed
    assert stats.mean_accepted_length > 4.5  # 5 per verify, bar the budget's last short step


def test_frspec_full_vocabulary_equals_plain_speculation(stories, stories_draft, stories_fr):
    ids = stories.tokenizer.encode("Once upon a time")
    assert sorted(stories_fr[512].tolist()) == list(range(512))  # a permutation of every id
    plain = speculate(stories, ids, LayerSkipProposer(stories, 2), 128, num_draft=4)
    full = speculate(
        stories, ids, LayerSkipProposer(stories, 2, frspec_ids=stories_fr[512]), 128, num_draft=4
    )
    assert plain == full  # same tokens, same number of proposals and acceptances


def test_yields_what_generate_step_yields(stories, stories_draft):
    ids = stories.tokenizer.encode("Once upon a time")
    ref = list(generate_step(stories, ids, max_tokens=40))
    out = list(speculative_generate_step(stories, ids, DraftModelProposer(stories_draft), max_tokens=40))
    assert [t for t, _ in out] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(out, ref):
        assert a.shape == b.shape == (512,) and torch.allclose(a, b, atol=1e-4)


def test_logits_processors_apply_per_position(stories, stories_draft):
    ids = stories.tokenizer.encode("Once upon a time")
    penalty = [make_repetition_penalty(1.3)]
    out, _ = speculate(stories, ids, DraftModelProposer(stories_draft), 100, logits_processors=penalty)
    assert out == greedy(stories, ids, 100, logits_processors=penalty)
    assert out != greedy(stories, ids, 100)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7])
def test_never_more_than_max_tokens(stories, max_tokens):
    ids = stories.tokenizer.encode("Tom had a red ball. Tom had a red ball. Tom had a red")
    out, _ = speculate(stories, ids, NgramProposer(), max_tokens, num_draft=8, adaptive=False)
    assert out == greedy(stories, ids, max_tokens)


def test_stops_at_context_end_like_generate_step(stories, stories_draft):
    prompt = stories.tokenizer.encode("Once upon a time " * 200)[: stories.context_length - 6]
    out, _stats = speculate(
        stories, prompt, DraftModelProposer(stories_draft), 100, num_draft=4, adaptive=False
    )
    assert out == greedy(stories, prompt, 100) and len(out) == 6


def test_cache_ends_holding_every_token(stories, stories_draft):
    ids = stories.tokenizer.encode("Once upon a time")
    plain, spec = stories.make_cache(), stories.make_cache()
    greedy(stories, ids, 30, cache=plain)
    speculate(stories, ids, DraftModelProposer(stories_draft), 30, cache=spec)
    assert plain[0].offset == spec[0].offset == len(ids) + 30


class NoTrim:
    """A KV cache that refuses trim(), as a recurrent state does: forces snapshot/restore."""

    def __init__(self, cache: KVCache):
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def trim(self, n: int) -> int:
        raise ValueError("cannot trim")


def test_untrimmable_target_cache_rolls_back_by_snapshot(stories, stories_draft):
    ids = stories.tokenizer.encode("Once upon a time")
    cache = [NoTrim(c) for c in stories.make_cache()]
    out, stats = speculate(stories, ids, LayerSkipProposer(stories, 3), 80, cache=cache)
    assert out == greedy(stories, ids, 80)
    assert stats.num_accepted < stats.num_proposed  # rejections happened, so restore ran


def tree_draft(model, ids: list[int], **kwargs) -> Draft:
    """A real draft tree: layer-skip top-3 / top-2 / chain for 3 depths, plus an extra branch."""
    draft = LayerSkipProposer(model, 1, branches=(3, 2), **kwargs).propose(ids, 3)
    assert draft.parents is not None and draft.depth == 3
    return draft


@pytest.mark.parametrize("fast", [True, False])
def test_tree_verify_equals_every_path_alone(stories, smol, fast):
    """One tree forward gives each node the logits of its own path run as a plain sequence
    (C++ step and module path), and keep() leaves the cache of the accepted path alone."""
    for model, atol in ((stories, 1e-4), (smol, 3e-4)):
        ids = model.tokenizer.encode("Once upon a time there was a little")
        draft = tree_draft(model, ids)
        model.fast_decode = fast
        try:
            with torch.inference_mode():
                cache = model.make_cache()
                model(torch.tensor([ids[:-1]]), cache)
                start = cache[0].offset
                tree = torch.tensor([-1] + [p + 1 for p in draft.parents])
                out = model(torch.tensor([ids[-1:] + draft.tokens]), cache, tree=tree)[0]
                for i in range(-1, len(draft.tokens)):
                    path = draft.path_tokens(i) if i >= 0 else []
                    ref = model(torch.tensor([ids + path]))[0, -1]
                    torch.testing.assert_close(out[i + 1], ref, atol=atol, rtol=0)
                leaf = len(draft.tokens) - 1  # a runner-up leaf off the chain
                kept = [0] + [j + 1 for j in path_nodes(draft, leaf)]
                for c in cache:
                    c.keep(start, kept)
                after = model(torch.tensor([[7]]), cache)[0, -1]
                ref = model(torch.tensor([ids + draft.path_tokens(leaf) + [7]]))[0, -1]
                torch.testing.assert_close(after, ref, atol=atol, rtol=0)
        finally:
            model.fast_decode = True


def path_nodes(draft: Draft, i: int) -> list[int]:
    nodes = []
    while i >= 0:
        nodes.append(i)
        i = draft.parents[i]
    return nodes[::-1]


def test_tree_drafts_and_bad_trees(stories):
    context = [1, 2, 3, 1, 4, 5, 1, 2, 6, 1]  # after "1": 2 6 1 (latest), 4 5 1, 2 3 1
    trie = NgramProposer(n_max=1, branches=3).propose(context, 3)
    assert trie.tokens == [2, 6, 1, 4, 5, 1, 3, 1] and trie.parents == [-1, 0, 1, -1, 3, 4, 0, 6]
    assert trie.chain().tokens == NgramProposer(n_max=1).propose(context, 3).tokens == [2, 6, 1]
    assert NgramProposer(n_max=1, branches=2).propose(context, 3).parents == [-1, 0, 1, -1, 3, 4]
    ids = stories.tokenizer.encode("Tom had a red ball. Tom had a red ball. Tom had a red")
    with pytest.raises(ValueError, match="branches must be >= 1"):
        LayerSkipProposer(stories, 2, branches=(2, 0))
    with pytest.raises(ValueError, match="branches must be >= 1"):
        NgramProposer(branches=0)
    with pytest.raises(ValueError, match="confident must be in"):
        LayerSkipProposer(stories, 2, branches=(2,), confident=0.0)
    # dynamic trees: no runner-up where the draft is sure of its token, all of them when never sure
    layers = 1
    never, always = (LayerSkipProposer(stories, layers, branches=(2, 2, 2), confident=c) for c in (1e-9, 1.0))
    assert never.propose(ids, 3).parents is None and len(always.propose(ids, 3).tokens) == 6
    x = torch.tensor([ids[:4]])
    with pytest.raises(ValueError, match="parents must come before their children"):
        stories(x, stories.make_cache(), tree=torch.tensor([-1, 2, 0, 1]))
    with pytest.raises(ValueError, match="cannot verify a draft tree"):
        stories(x, None, tree=torch.tensor([-1, 0, 0, 1]))


def test_adaptive_draft_length():
    cheap = DraftLength(6, cost=0.0, adaptive=True)
    for _ in range(10):
        cheap.update(6, 6)  # everything accepted, drafting free: draft the most
    assert cheap.next() == 6
    costly = DraftLength(6, cost=0.9, adaptive=True)
    for _ in range(10):
        costly.update(4, 0)  # nothing accepted at nearly a target forward per token: stop drafting
    assert [costly.next() for _ in range(9)] == [0] * 8 + [1]  # but re-measure now and then
    assert DraftLength(6, cost=0.9, adaptive=False).next() == 6


# ---------------------------------------------------------------- other architectures

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
TINY_MODELS = {
    "gemma3": dict(
        TINY,
        model_type="gemma3_text",
        head_dim=8,
        sliding_window=12,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "granite": dict(
        TINY,
        model_type="granite",
        embedding_multiplier=4.0,
        logits_scaling=3.0,
        attention_multiplier=0.3,
        residual_multiplier=0.5,
    ),
    "mamba2": {
        "vocab_size": 96,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_heads": 8,
        "head_dim": 8,
        "state_size": 16,
        "n_groups": 1,
        "chunk_size": 8,
        "model_type": "mamba2",
    },
}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_layerskip_on_other_architectures(name):
    torch.manual_seed(0)
    model = build_model(TINY_MODELS[name]).eval()
    for p in model.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.5)
    ids = torch.randint(0, 96, (20,)).tolist()
    ref = greedy(model, ids, 60)  # 60 > the gemma3 window: sliding caches trim past it
    ranking = torch.randperm(96)[:48]
    # a tree draft falls back to its chain on targets that cannot verify trees (windows, Mamba)
    tree = LayerSkipProposer(model, 1, branches=(2, 2))
    for proposer in (LayerSkipProposer(model, 2), LayerSkipProposer(model, 1, frspec_ids=ranking), tree):
        out, stats = speculate(model, ids, proposer, 60, num_draft=3, adaptive=False)
        assert out == ref and stats.num_proposed > 0


# ---------------------------------------------------------------- SmolLM2 (real 49K vocabulary)

SMOL_PROPOSERS = {
    "ngram": lambda m, fr: NgramProposer(n_max=3),
    "draft": lambda m, fr: DraftModelProposer(m),  # the target as its own draft: all accepted
    "layerskip": lambda m, fr: LayerSkipProposer(m, 4),  # few layers: cheap, often rejected
    "tree-layerskip": lambda m, fr: LayerSkipProposer(m, 4, branches=(3, 2)),
    "ngram-trie": lambda m, fr: NgramProposer(n_max=3, branches=4),
    "frspec-layerskip": lambda m, fr: LayerSkipProposer(m, 4, frspec_ids=fr[8192]),
}
_smol_reference = {}


def smol_prompt(model, kind: str) -> list[int]:
    tok = model.tokenizer
    if kind == "code":
        return tok.encode(CODE_PROMPT)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    return tok.encode(chat, add_special_tokens=False)


@pytest.mark.parametrize("name", SMOL_PROPOSERS)
@pytest.mark.parametrize("kind", ["chat", "code"])
def test_smollm2_greedy_identical(smol, smol_fr, kind, name):
    ids = smol_prompt(smol, kind)
    if kind not in _smol_reference:
        _smol_reference[kind] = greedy(smol, ids, 48)
    out, stats = speculate(
        smol, ids, SMOL_PROPOSERS[name](smol, smol_fr), 48, num_draft=4, adaptive=name != "draft"
    )
    assert out == _smol_reference[kind]
    if name == "draft":
        assert stats.num_accepted == stats.num_proposed > 0


# ---------------------------------------------------------------- sampling: distribution == target's


class ToyTokenizer:
    bos_token_id, eos_token_ids = None, []

    def __init__(self, vocab_size: int, pieces: dict[int, str] | None = None):
        self.vocab_size = vocab_size
        self.pieces = {i: f"<{i}>" for i in range(vocab_size)} | (pieces or {})

    def id_to_token(self, i: int) -> str:
        return self.pieces[i]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]


class BigramLM(nn.Module):
    """Next-token logits depend on the current token only: logits = table[token]. Same interface
    as a real model (`model(tokens, cache, num_logits)`, `make_cache`, `lm_head`)."""

    context_length = 1 << 20

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.vocab_size = table.shape[0]
        self.lm_head = nn.Linear(self.vocab_size, self.vocab_size, bias=False)
        self.lm_head.weight.data = table.T.contiguous()  # onehot(a) @ table = table[a]
        self.layers = nn.ModuleList()
        self.tokenizer = ToyTokenizer(self.vocab_size)

    def make_cache(self) -> list:
        return [KVCache()]

    def supports_tree(self, cache) -> bool:
        return True  # logits depend on the token alone, wherever it sits in a tree

    def forward(self, tokens: torch.Tensor, cache=None, num_logits: int | None = None, tree=None) -> torch.Tensor:
        tokens = tokens.reshape(1, -1)
        if cache:
            cache[0].offset += tokens.shape[1]  # only positions matter for rollback here
        h = F.one_hot(tokens, self.vocab_size).float()[:, -(num_logits or tokens.shape[1]) :]
        return self.lm_head(h)


def transition_pvalue(tokens: list[int], probs: torch.Tensor) -> float:
    """Chi-square test that every transition a -> b in `tokens` follows probs[a] (V, V)."""
    V = probs.shape[0]
    counts = torch.zeros(V, V)
    counts.index_put_(
        (torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])), torch.tensor(1.0), accumulate=True
    )
    expected = counts.sum(1, keepdim=True) * probs
    if counts[expected == 0].sum() > 0:
        return 0.0  # a token the target gives probability 0 was emitted
    cells = expected > 0
    stat = ((counts - expected)[cells] ** 2 / expected[cells]).sum()
    df = int(cells.sum()) - V
    return float(torch.special.gammaincc(torch.tensor(df / 2), stat / 2))


TABLE_V = 6
SAMPLING_CASES = {
    "draft-model": (lambda d: DraftModelProposer(d), SamplingParams(1.0)),
    "ngram-point-mass": (lambda d: NgramProposer(n_max=2), SamplingParams(1.0)),
    "frspec-q-zero-outside": (
        lambda d: DraftModelProposer(d, frspec_ids=torch.tensor([0, 2, 3])),
        SamplingParams(1.0),
    ),
    "temperature-top-k": (lambda d: DraftModelProposer(d), SamplingParams(0.7, top_k=4)),
    # trees: a drawn chain child first, then point-mass runners-up; n-gram tries (point masses)
    "tree-draft": (lambda d: DraftModelProposer(d, branches=(3, 2)), SamplingParams(1.0)),
    "tree-frspec": (
        lambda d: DraftModelProposer(d, frspec_ids=torch.tensor([0, 2, 3, 5]), branches=(2, 2)),
        SamplingParams(1.0),
    ),
    "ngram-trie": (lambda d: NgramProposer(n_max=2, branches=3), SamplingParams(0.7, top_k=4)),
}


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_speculative_sampling_follows_target_distribution(case):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(TABLE_V, TABLE_V, generator=g)
    target, draft = BigramLM(table), BigramLM(table + 1.2 * torch.randn(TABLE_V, TABLE_V, generator=g))
    make_proposer, params = SAMPLING_CASES[case]
    sampling = SamplingParams(
        params.temperature, top_k=params.top_k, generator=torch.Generator().manual_seed(1)
    )
    out, stats = speculate(
        target, [0], make_proposer(draft), 3000, num_draft=3, adaptive=False, sampling=sampling
    )
    assert len(out) == 3000 and 0 < stats.num_accepted < stats.num_proposed
    assert transition_pvalue([0] + out, params.probs(table)) > 1e-3
    # the test has power: the draft's own samples fail it
    plain = [
        t
        for t, _ in generate_step(
            draft,
            [0],
            max_tokens=3000,
            sampler=lambda x: torch.multinomial(params.probs(x), 1, generator=g).squeeze(-1),
        )
    ]
    assert transition_pvalue([0] + plain, params.probs(table)) < 1e-6


# ---------------------------------------------------------------- FR-Spec files and bad input


def test_frspec_file_round_trip_and_wrong_vocabulary(tmp_path, stories, smol):
    path = tmp_path / "fr.safetensors"
    ranking = build_frequency_file(STORIES, TEXT, "64,128", path, max_lines=500)
    loaded = load_frequency_ranking(path, stories.tokenizer)
    assert set(loaded) == {64, 128} and torch.equal(loaded[128], ranking[128])
    assert torch.equal(loaded[128][:64], loaded[64]) and loaded[64].unique().numel() == 64
    assert torch.equal(pick_size(loaded), loaded[128])
    with pytest.raises(ValueError, match="vocabulary of 512 tokens.*49152"):
        load_frequency_ranking(path, smol.tokenizer)
    with pytest.raises(ValueError, match="no FR-Spec vocabulary of size 100"):
        pick_size(loaded, 100)


def test_frspec_file_for_another_tokenizer_of_the_same_size(tmp_path):
    path = tmp_path / "fr.safetensors"
    a, b = ToyTokenizer(8), ToyTokenizer(8, {5: "five"})
    save_frequency_ranking(path, build_frequency_ranking(a, TEXT, [4], max_lines=50), a)
    assert load_frequency_ranking(path, a)[4].numel() == 4
    with pytest.raises(ValueError, match="another tokenizer"):
        load_frequency_ranking(path, b)


def test_frspec_bad_sizes(stories):
    with pytest.raises(ValueError, match="outside 1..512"):
        build_frequency_ranking(stories.tokenizer, TEXT, [600], max_lines=10)
    with pytest.raises(ValueError, match="comma-separated"):
        build_frequency_file(STORIES, TEXT, "8k", "/tmp/unused.safetensors")


def test_tokenizer_mismatch_is_refused(stories, smol):
    ids = stories.tokenizer.encode("Once upon a time")
    with pytest.raises(ValueError, match="tokenizer mismatch.*49152.*512"):
        next(speculative_generate_step(smol, ids, DraftModelProposer(stories)))
    target, draft = BigramLM(torch.zeros(8, 8)), BigramLM(torch.zeros(8, 8))
    draft.tokenizer = ToyTokenizer(8, {5: "five"})
    with pytest.raises(ValueError, match="id 5 is '<5>' for the target but 'five' for the draft"):
        next(speculative_generate_step(target, [0], DraftModelProposer(draft)))


def test_bad_arguments(stories):
    ids = stories.tokenizer.encode("Once upon a time")
    for k in (0, -1):
        with pytest.raises(ValueError, match="num_draft must be a positive"):
            next(speculative_generate_step(stories, ids, NgramProposer(), num_draft=k))
    with pytest.raises(ValueError, match="num_layers must be in 1..4"):
        LayerSkipProposer(stories, 5)
    with pytest.raises(ValueError, match="n_min <= n_max"):
        NgramProposer(n_max=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        next(speculative_generate_step(stories, [], NgramProposer()))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(-1.0)


class PackedLinear(nn.Module):
    """A linear layer holding int8 codes and row scales, no float weight: a quantized LM head."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("scale", w.abs().amax(1, keepdim=True) / 127)  # (V, 1)
        self.register_buffer("codes", (w / self.scale).round().to(torch.int8))  # (V, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.codes.float() * self.scale).T


def test_frspec_over_a_quantized_head(stories, stories_fr):
    draft = copy.deepcopy(stories)
    draft.lm_head = PackedLinear(stories.lm_head)  # the tied embedding stays float
    ids_fr = stories_fr[64]
    x = torch.tensor([stories.tokenizer.encode("Once upon a time")])
    with torch.inference_mode():
        assert torch.allclose(restrict_lm_head(draft, ids_fr)(x), draft(x)[..., ids_fr], atol=1e-4)
    ids = x[0].tolist()
    out, stats = speculate(stories, ids, DraftModelProposer(draft, frspec_ids=ids_fr), 80)
    assert out == greedy(stories, ids, 80) and stats.num_accepted > 0


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_frspec_head_of_a_quantized_draft_stays_quantized(stories, stories_fr, method):
    """The restricted head of an int4/int8 draft keeps its codes (not an fp32 copy, which would
    read more bytes than the full quantized head) and gives exactly the full head's logits at ids."""
    from edgelm.quant import quantize_model

    draft = quantize_model(copy.deepcopy(stories), method, predicate=lambda path, m: path == "lm_head")
    ids_fr = stories_fr[64]
    view = restrict_lm_head(draft, ids_fr)
    assert type(view.lm_head) is type(draft.lm_head) and view.lm_head.out_features == 64
    assert draft.lm_head.out_features == 512  # the draft itself is untouched
    x = torch.tensor([stories.tokenizer.encode("Once upon a time")])
    with torch.inference_mode():
        assert torch.equal(view(x), draft(x)[..., ids_fr])
    ids = x[0].tolist()
    out, stats = speculate(stories, ids, DraftModelProposer(draft, frspec_ids=ids_fr), 60)
    assert out == greedy(stories, ids, 60) and stats.num_accepted > 0


def test_cli_helpers(tmp_path, stories):
    path = tmp_path / "fr.safetensors"
    top = argparse.ArgumentParser()
    add_frspec_parser(top.add_subparsers(dest="command"))
    cmd_frspec(
        top.parse_args(
            [
                "frspec",
                "build",
                "--model",
                str(STORIES),
                "--text",
                str(TEXT),
                "--sizes",
                "32,64",
                "--max-lines",
                "200",
                "--out",
                str(path),
            ]
        )
    )
    parser = argparse.ArgumentParser()
    add_speculative_args(parser)
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None}

    def flags(*argv):
        return argparse.Namespace(**vars(parser.parse_args(list(argv))), **sampling)

    args = flags("--speculative", "layer-skip", "--draft-layers", "3", "--frspec", str(path),
                 "--frspec-size", "32", "--num-draft", "3")
    steps = step_fn_from_args(args, stories)
    ids = stories.tokenizer.encode("Once upon a time")
    assert [t for t, _ in steps(stories, ids, max_tokens=40)] == greedy(stories, ids, 40)
    assert steps.stats.num_tokens == 40 and steps.stats.num_steps > 0
    assert step_fn_from_args(flags(), stories) is None
    bad = {
        "--frspec applies to model drafts": ["--speculative", "ngram", "--frspec", str(path)],
        "--speculative draft and --draft-model": ["--speculative", "draft"],
        "--draft-layers applies to": ["--speculative", "ngram", "--draft-layers", "2"],
        "--num-draft must be positive": ["--speculative", "ngram", "--num-draft", "0"],
    }
    for match, argv in bad.items():
        with pytest.raises(ValueError, match=match):
            step_fn_from_args(flags(*argv), stories)
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative", "medusa"])
