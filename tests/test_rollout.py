"""Chunk-wise rollout and the GRPO loop on stories260K:

- greedy trajectories with a per-stage budget smaller than the generation length == the same
  trajectories without a budget (tokens, finish reasons, log-probs), in more stages, whether parked
  trajectories keep their KV cache (LLMEngine.park/resume) or recompute it;
- chunks tile each output, never exceed the budget and record the policy version of their stage;
- the chunk-level GRPO loss against a hand computation, clipping, and a few real training steps;
- bad budgets and rewards are clear errors.
"""

from pathlib import Path

import pytest
import torch

from edgelm import load
from edgelm.engine import LLMEngine
from edgelm.rl.grpo import GRPOTrainer, advantages, grpo_loss, make_reward, train_grpo
from edgelm.rl.rollout import ChunkedRollout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
PROMPTS = ["Once upon a time", "The cat sat on the", "One day, a little dog", "Tom had a red ball"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompt_ids(stories):
    return [stories.tokenizer.encode(p) for p in PROMPTS]


def roll(model, prompts, budget, temperature=0.0, G=2, max_tokens=48, keep_cache=True):
    engine = LLMEngine(model, max_batch=4)
    rollout = ChunkedRollout(engine, G, budget, max_tokens, temperature=temperature, keep_cache=keep_cache)
    for p in prompts:
        rollout.add_prompt(p)
    return rollout.run(), rollout.stats


@pytest.mark.parametrize("keep_cache", [True, False], ids=["cache-kept", "recomputed"])
def test_budgeted_rollout_equals_unlimited_greedy(stories, prompt_ids, keep_cache):
    full, full_stats = roll(stories, prompt_ids, budget=None)
    chunked, chunked_stats = roll(stories, prompt_ids, budget=7, keep_cache=keep_cache)
    pairs = [(a, b) for ga, gb in zip(full, chunked) for a, b in zip(ga.samples, gb.samples)]
    assert len(pairs) == 2 * len(PROMPTS)
    assert any(len(a.output_ids) > 7 for a, _ in pairs)  # the budget really cuts trajectories
    for a, b in pairs:
        assert (a.group_id, a.index) == (b.group_id, b.index)
        assert a.output_ids == b.output_ids and a.finish_reason == b.finish_reason
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert len(b.chunks) == -(-len(b.output_ids) // 7) and len(a.chunks) == 1
    assert chunked_stats.num_stages > full_stats.num_stages
    assert chunked_stats.num_tokens == full_stats.num_tokens


def test_chunks_tile_outputs_and_record_policy_version(stories, prompt_ids):
    rollout = ChunkedRollout(
        LLMEngine(stories, max_batch=4), 2, budget=5, max_tokens=20, temperature=1.0, seed=3
    )
    for p in prompt_ids[:2]:
        rollout.add_prompt(p)
    groups, stage = [], 0
    while rollout.has_work:
        groups += rollout.run_stage()
        rollout.policy_version = stage = stage + 1  # as if the policy were updated after each stage
    for t in (t for g in groups for t in g.samples):
        assert [c.start for c in t.chunks] == [0] + [c.end for c in t.chunks[:-1]]
        assert t.chunks[-1].end == len(t.output_ids) == len(t.logprobs)
        assert all(0 < c.end - c.start <= 5 for c in t.chunks)
        assert [c.version for c in t.chunks] == sorted({c.version for c in t.chunks})  # one stage each
        assert all(lp <= 0 for lp in t.logprobs)


def test_grpo_loss_matches_hand_computation():
    new = torch.tensor([-1.0, -2.0, -0.5, -0.7], requires_grad=True)
    old = torch.tensor([-1.1, -2.2, -0.5, -1.3])
    ref = torch.tensor([-1.0, -2.0, -0.6, -0.7])
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    chunk = torch.tensor([0, 0, 1, 2])
    rho = torch.tensor([0.15, 0.0, 0.6]).exp()  # mean log-ratio per chunk
    a = torch.tensor([1.0, -1.0, 2.0])
    clipped = torch.minimum(rho * a, rho.clamp(0.8, 1.2) * a)
    d = ref - new.detach()
    expected = -(clipped * torch.tensor([2.0, 1, 1])).sum() / 4 + 0.1 * (d.exp() - d - 1).mean()
    loss = grpo_loss(new, old, ref, adv, chunk, clip_eps=0.2, beta=0.1)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # chunks 0 (rho = 1.16, inside 1 +- eps) and 1 (rho = 1) get policy gradient; chunk 2 (rho =
    # 1.82 > 1 + eps with A > 0: clipped) gets none
    (grad,) = torch.autograd.grad(grpo_loss(new, old, new.detach(), adv, chunk, 0.2, 0.0), new)
    assert grad[0] != 0 and grad[2] != 0 and grad[3] == 0


def test_advantages_are_group_normalised():
    adv = advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert adv[0].tolist() == pytest.approx([1, -1, -1, 1], abs=1e-3)
    assert adv[1].tolist() == [0, 0, 0, 0]  # no signal when all samples tie


def test_grpo_steps_update_policy_and_versions(prompt_ids):
    model = load(SHARED / "stories260K" / "stories260K.bin", dtype=torch.float32)  # trained in place
    before = [p.detach().clone() for p in model.parameters()]
    rollout = ChunkedRollout(LLMEngine(model, max_batch=8), 4, budget=8, max_tokens=24, temperature=1.0)
    trainer = GRPOTrainer(model, make_reward("word:Lily"), lr=1e-2)  # some samples name Lily, some not
    logs = train_grpo(model, rollout, prompt_ids, trainer, steps=4)
    assert sum(log.num_groups for log in logs) > 0 and logs[-1].policy_version > 0
    assert all(log.loss == log.loss for log in logs if log.num_groups)  # finite, not NaN
    # no weight decay and KL = 0 at the start: parameters move only if rewards differed in a group
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    versions = {c.version for g in rollout.active.values() for t in g.samples for c in t.chunks}
    assert max(versions, default=0) > 0  # later stages ran under updated policies


def test_bad_budget_and_reward(stories):
    engine = LLMEngine(stories, max_batch=2)
    for budget in (0, -3):
        with pytest.raises(ValueError, match="budget must be a positive"):
            ChunkedRollout(engine, 2, budget=budget)
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("contains")
    rollout = ChunkedRollout(engine, 2, budget=4)
    with pytest.raises(ValueError, match="one per sample"):
        rollout.add_prompt([1, 2], max_tokens=[3])


def test_reward_functions():
    word, length = make_reward("word:ball"), make_reward("length:10")
    assert word("Tom threw the Ball.", 5) == 1.0 and word("a balloon", 5) == 0.0
    assert length("", 10) == 1.0 and length("", 15) == 0.5 and length("", 40) == 0.0
