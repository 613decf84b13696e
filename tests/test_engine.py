"""The continuous-batching engine against the batch-1 generator, on stories260K (and a tiny random
Gemma 3 for sliding windows):

- greedy tokens of prompts batched together (or joining mid-run, or preempted under a tiny KV
  budget, with chunked prefill) == each prompt alone through `generate_step`;
- a seeded request samples the same tokens whatever runs beside it;
- abort frees the slot and its bytes; the budget holds after every step;
- one sequence failing does not disturb the others.
"""

from pathlib import Path

import pytest
import torch

from edgelm.engine import LLMEngine, SamplingParams
from edgelm.engine.runner import attention_shapes
from edgelm.engine.scheduler import Scheduler
from edgelm.engine.sequence import Sequence
from edgelm.generate import generate_step
from edgelm.models import build_model
from edgelm.sampling import make_sampler

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
PROMPTS = [
    "Once upon a time",
    "The cat sat on the",
    "Lily and Ben went to the park. They saw a big",
    "One day, a little dog",
    "Tom had a red ball",
    "The sun was hot and the sky was",
]
MAX_STEPS = 5000


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompt_ids(stories):
    return [stories.tokenizer.encode(p) for p in PROMPTS]


def solo(model, ids: list[int], max_tokens: int, sampler=None) -> list[int]:
    return [t for t, _ in generate_step(model, ids, max_tokens=max_tokens, sampler=sampler)]


def run(engine: LLMEngine, outputs: dict | None = None, steps: int = MAX_STEPS) -> dict[int, list[int]]:
    """Step until idle (or `steps`), collecting tokens per sequence and checking the accounting."""
    outputs = {} if outputs is None else outputs
    for _ in range(steps):
        if not engine.has_work:
            break
        for out in engine.step():
            if out.token is not None:
                outputs.setdefault(out.seq_id, []).append(out.token)
        check_accounting(engine)
    return outputs


def check_accounting(engine: LLMEngine) -> None:
    cache = engine.runner.cache
    assert engine.cache_bytes_in_use <= engine.max_cache_bytes
    assert engine.cache_bytes_in_use == sum(cache.lengths) * engine.bytes_per_token
    assert len(cache.lengths) == len(engine.scheduler.running) <= engine.scheduler.max_batch
    for seq in engine.scheduler.running:
        assert cache.lengths[engine.runner.slot_of[seq.id]] == seq.num_cached


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def fake_step(plan) -> None:
    """What the runner and sampler do to the sequences, without a model."""
    for seq in plan.sampling:
        seq.token_ids.append(0)
    for seq, end in plan.prefills:
        seq.num_cached = end
    for seq in plan.decode:
        seq.num_cached += 1


def test_scheduler_prefill_allowance_and_admission():
    seqs = [Sequence(i, [1] * n, greedy(5), context_length=512) for i, n in enumerate([25, 4, 3, 8])]
    sched = Scheduler(max_batch=3, max_cache_tokens=40, prefill_chunk=10)
    for seq in seqs:
        sched.add(seq)
    steps = []
    for _ in range(4):
        plan = sched.schedule()
        steps.append(([(s.id, end) for s, end in plan.prefills], [s.id for s in plan.decode]))
        fake_step(plan)
    assert steps == [
        ([(0, 10)], []),  # a long prompt takes the whole allowance...
        ([(0, 20)], []),
        ([(0, 25), (1, 4), (2, 1)], []),  # ...its last chunk leaves room for short ones
        ([(2, 3)], [0, 1]),  # max_batch 3 keeps sequence 3 waiting (nor would it fit: 26 + 5 + 3 + 8 > 40)
    ]
    assert list(sched.waiting) == [seqs[3]]


def test_batched_greedy_equals_each_alone(stories, prompt_ids):
    engine = LLMEngine(stories, max_batch=8, prefill_chunk=4)  # prompts span several chunks
    ids = [engine.add_request(p, greedy(60)) for p in prompt_ids]
    out = run(engine)
    for seq_id, p in zip(ids, prompt_ids):
        assert out[seq_id] == solo(stories, p, 60)
    assert engine.cache_bytes_in_use == 0 and engine.runner.cache.nbytes == 0


def test_requests_joining_mid_run(stories, prompt_ids):
    engine = LLMEngine(stories, max_batch=4)
    ids, out = [], {}
    for i, p in enumerate(prompt_ids):  # one new request every 7 steps; max_batch 4 makes some wait
        ids.append(engine.add_request(p, greedy(30 + 5 * i)))
        run(engine, out, steps=7)
    run(engine, out)
    for i, (seq_id, p) in enumerate(zip(ids, prompt_ids)):
        assert out[seq_id] == solo(stories, p, 30 + 5 * i)


def test_preemption_under_tiny_budget_keeps_greedy_tokens(stories, prompt_ids):
    bpt = LLMEngine(stories).bytes_per_token
    engine = LLMEngine(stories, max_batch=6, max_cache_bytes=120 * bpt, prefill_chunk=8)
    ids = [engine.add_request(p, greedy(80)) for p in prompt_ids]  # ~90 tokens each, 120 for all
    out = run(engine)
    assert engine.stats().num_preempted > 0
    for seq_id, p in zip(ids, prompt_ids):
        assert out[seq_id] == solo(stories, p, 80)


def test_budget_caps_a_lone_sequence(stories, prompt_ids):
    bpt = LLMEngine(stories).bytes_per_token
    engine = LLMEngine(stories, max_cache_bytes=20 * bpt)
    seq_id = engine.add_request(prompt_ids[0], greedy(100))
    finals = [o for _ in range(200) for o in engine.step() if o.finish_reason]
    assert [(o.seq_id, o.finish_reason) for o in finals] == [(seq_id, "length")]
    assert 20 - len(prompt_ids[0]) <= finals[0].num_output_tokens <= 21 - len(prompt_ids[0])
    with pytest.raises(ValueError, match="cache budget"):
        engine.add_request(list(range(3, 30)), greedy(4))


def test_abort_frees_slot_and_bytes(stories, prompt_ids):
    engine = LLMEngine(stories, max_batch=4)
    ids = [engine.add_request(p, greedy(50)) for p in prompt_ids[:3]]
    run(engine, steps=12)
    assert len(engine.runner.cache.lengths) == 3 and engine.cache_bytes_in_use > 0
    held = engine.cache_bytes_in_use
    victim = engine.scheduler.running[0]  # slot 0: freeing it moves the last slot into it
    dropped = victim.num_cached * engine.bytes_per_token
    final = engine.abort(victim.id)
    assert final.finish_reason == "abort"
    assert engine.cache_bytes_in_use == held - dropped and len(engine.runner.cache.lengths) == 2
    check_accounting(engine)
    out = run(engine)  # the survivors finish exactly as they would have
    for seq_id, p in zip(ids[1:], prompt_ids[1:3]):
        assert solo(stories, p, 50)[-len(out[seq_id]) :] == out[seq_id]
    assert engine.abort(victim.id) is None
    assert engine.cache_bytes_in_use == 0 and not engine.seqs


def test_abort_waiting_request(stories, prompt_ids):
    engine = LLMEngine(stories, max_batch=1)
    first, second = (engine.add_request(p, greedy(20)) for p in prompt_ids[:2])
    engine.step()
    assert engine.abort(second).finish_reason == "abort"
    out = run(engine)
    assert list(out) == [first] and not engine.scheduler.waiting


def test_seeded_sampling_ignores_batch_composition(stories, prompt_ids):
    params = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    sampler = make_sampler(1.0, 0.9, generator=torch.Generator().manual_seed(1234))
    reference = solo(stories, prompt_ids[0], 40, sampler)
    alone = LLMEngine(stories)
    seq = alone.add_request(prompt_ids[0], params)
    assert run(alone)[seq] == reference
    crowd = LLMEngine(stories, max_batch=6)
    for i, p in enumerate(prompt_ids[1:4]):  # neighbours sample from their own generators
        crowd.add_request(p, SamplingParams(max_tokens=30, temperature=1.0, seed=i, ignore_eos=True))
    seq = crowd.add_request(prompt_ids[0], params)
    crowd.add_request(prompt_ids[4], SamplingParams(max_tokens=30, temperature=0.7, ignore_eos=True))
    assert run(crowd)[seq] == reference


def test_stop_and_eos_end_sequences(stories, prompt_ids):
    engine = LLMEngine(stories)
    stopped = engine.add_request(prompt_ids[0], SamplingParams(max_tokens=80, stop=["Lily"]))
    ended = engine.add_request(prompt_ids[3], SamplingParams(max_tokens=80))
    expected = solo(stories, prompt_ids[3], 80)
    eos = expected[9]  # greedy stories260K never emits </s>: stand in a token it does emit
    engine.seqs[ended].eos_ids = frozenset([eos])
    finals = {}
    for _ in range(MAX_STEPS):
        if not engine.has_work:
            break
        for o in engine.step():
            finals.setdefault(o.seq_id, []).append(o)
    text = "".join(o.text for o in finals[stopped])
    assert text == ", there was a little girl named " and finals[stopped][-1].finish_reason == "stop"
    assert [o.token for o in finals[ended]] == expected[: expected.index(eos) + 1]
    assert finals[ended][-1].finish_reason == "stop"
    text = "".join(o.text for o in finals[ended])  # the EOS token itself is not text
    assert text.lstrip() == stories.tokenizer.decode(expected[: expected.index(eos)])


def test_failing_sequence_does_not_disturb_others(stories, prompt_ids):
    engine = LLMEngine(stories)
    good = engine.add_request(prompt_ids[0], greedy(30))
    bad = engine.add_request(prompt_ids[1], greedy(30))

    def broken(logits):
        raise RuntimeError("boom")

    engine.seqs[bad].sampler = broken
    finals = {}
    out = {}
    for _ in range(MAX_STEPS):
        if not engine.has_work:
            break
        for o in engine.step():
            finals[o.seq_id] = o.finish_reason
            if o.token is not None:
                out.setdefault(o.seq_id, []).append(o.token)
    assert finals == {good: "length", bad: "error"}
    assert out[good] == solo(stories, prompt_ids[0], 30)


def test_logprobs_match_log_softmax(stories, prompt_ids):
    engine = LLMEngine(stories)
    seq = engine.add_request(prompt_ids[0], SamplingParams(max_tokens=5, logprobs=3))
    outs = [o for _ in range(20) for o in engine.step()]
    ref = [lg.log_softmax(-1) for _, lg in generate_step(stories, prompt_ids[0], max_tokens=5)]
    assert len(outs) == 5 and all(o.seq_id == seq for o in outs)
    for o, lp in zip(outs, ref):
        assert abs(o.logprob.logprob - float(lp[o.token])) < 1e-4
        assert [t for t, _ in o.logprob.top] == lp.topk(3).indices.tolist()


def test_sliding_window_batched_matches_alone():
    """Gemma 3 (sliding + global layers, soft-capping): the window is applied by masking."""
    config = dict(
        model_type="gemma3_text",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=8,
    )
    model = build_model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 9, 17)]
    engine = LLMEngine(model, prefill_chunk=5)
    ids = [engine.add_request(p, greedy(20)) for p in prompts]
    out = run(engine)
    for seq_id, p in zip(ids, prompts):
        assert out[seq_id] == solo(model, p, 20)


def test_invalid_requests_and_models(stories):
    engine = LLMEngine(stories)
    with pytest.raises(ValueError, match="context"):
        engine.add_request(list(range(3, 3 + 600)))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1, 2], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([1, 2], SamplingParams(max_tokens=0))

    class Mamba(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(NotImplementedError, match="attention-only"):
        attention_shapes(Mamba())
    with pytest.raises(ValueError):
        Scheduler(max_batch=0, max_cache_tokens=10, prefill_chunk=4)
