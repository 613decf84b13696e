"""Generation on real checkpoints: golden outputs, sampling, stop conditions, bad prompts."""

from pathlib import Path

import pytest
import torch

from edgelm import load
from edgelm.generate import generate, generate_step, stream_generate
from edgelm.sampling import apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty, make_sampler, sample_from

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES_GOLDEN = (
    ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, "
    "red ball. She wanted to play with it, but it was too high."
)


@pytest.fixture(scope="module")
def smol():
    return load(SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("source", ["stories260K.bin", "hf"])
def test_stories_golden_text(source):
    model = load(SHARED / "stories260K" / source, dtype=torch.float32)
    out = generate(model, "Once upon a time", max_tokens=len(STORIES_GOLDEN))
    assert out.text.startswith(STORIES_GOLDEN), out.text


def test_smollm2_chat_answers_paris(smol):
    out = generate(smol, "What is the capital of France?", chat=True, max_tokens=32)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, not the token budget


def test_streaming_equals_final_text(stories):
    pieces = [r.text for r in stream_generate(stories, "Once upon a time", max_tokens=60)]
    ids = [t for t, _ in generate_step(stories, stories.tokenizer.encode("Once upon a time"), max_tokens=60)]
    assert "".join(pieces) == stories.tokenizer.decode(ids)


def test_stop_string_cuts_text(stories):
    out = generate(stories, "Once upon a time", max_tokens=80, stop=["Lily"])
    assert out.text == ", there was a little girl named "
    assert out.finish_reason == "stop"


def test_max_tokens_and_stats(stories):
    out = generate(stories, "Once upon a time", max_tokens=10)
    assert out.generated_tokens == 10 and out.finish_reason == "length"
    assert out.prompt_tokens == len(stories.tokenizer.encode("Once upon a time"))
    assert out.ttft_s > 0 and out.prefill_tok_s > 0 and out.decode_tok_s > 0 and out.peak_rss_mb > 0


def test_generation_stops_at_context_end(stories):
    prompt = stories.tokenizer.encode("Once upon a time " * 200)[: stories.context_length - 5]
    steps = list(generate_step(stories, prompt, max_tokens=100))
    assert len(steps) == 5


def test_chunked_prefill_matches_single_pass(stories):
    prompt = stories.tokenizer.encode("Once upon a time, there was a big dog. " * 8)
    a = [t for t, _ in generate_step(stories, prompt, max_tokens=20)]
    b = [t for t, _ in generate_step(stories, prompt, max_tokens=20, prefill_chunk=7)]
    assert a == b


def test_seeded_sampling_is_reproducible(stories):
    def run(seed):
        sampler = make_sampler(0.8, top_p=0.9, generator=torch.Generator().manual_seed(seed))
        return generate(stories, "Once upon a time", max_tokens=30, sampler=sampler).text

    assert run(1) == run(1)
    assert run(1) != run(2)


# ---- bad prompts ----


def test_empty_prompt(stories):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(stories, "")


def test_prompt_longer_than_context(stories):
    long_prompt = "Once upon a time " * 300
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens but the model's context is 512"):
        generate(stories, long_prompt)


# ---- samplers (invariants on real-sized logits) ----


def test_top_k_keeps_k():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    kept = torch.isfinite(apply_top_k(logits, 5)).sum(-1)
    assert kept.tolist() == [5, 5]


def test_top_p_keeps_minimal_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    kept = torch.isfinite(apply_top_p(logits, 0.8))[0]
    n = int(kept.sum())
    assert kept[:n].all() and probs[: n - 1].sum() < 0.8 <= probs[:n].sum()


def test_min_p_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(apply_min_p(logits, 0.2))[0].tolist()
    assert kept == [True, True, True, False]  # 0.05 < 0.2 * 0.5


def test_repetition_penalty_matches_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = make_repetition_penalty(2.0)(torch.tensor([[0, 1]]), logits)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_sampling_distribution_follows_temperature():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    sampler = make_sampler(1.0, generator=torch.Generator().manual_seed(0))
    draws = torch.stack([sampler(logits) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.03)


def test_inverse_cdf_sampling_matches_the_distribution():
    """sample_from (the samplers' fast path) draws from probs exactly: chi-square against the
    expected counts, zero-probability tokens never, rows independent, a seed reproduces."""
    probs = torch.tensor([0.05, 0.0, 0.25, 0.4, 0.0, 0.3])
    n = 60000
    draws = sample_from(probs.expand(n, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[1] == 0 and counts[4] == 0
    live = probs > 0
    expected = probs[live].double() * n
    chi2 = float(((counts[live] - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001
    rows = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])])
    assert sample_from(rows).tolist() == [0, 2]
    a = sample_from(probs.expand(50, -1), torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_from(probs.expand(50, -1), torch.Generator().manual_seed(3)))


def test_bad_sampling_args():
    with pytest.raises(ValueError, match="top_p must be in"):
        make_sampler(1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        make_sampler(-1.0)
