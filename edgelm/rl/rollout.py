"""Chunk-wise rollout (MiniCPM4 §RL) on top of the batched engine.

G samples are drawn per prompt. Each *stage* gives every trajectory at most `budget` new tokens:
trajectories that finish go to training (a group once all G of its samples have finished), the
rest are *parked* with their tokens, per-token log-probs and the policy version of each chunk, and
resume in the next stage merged with new prompts. A stage holds at most `stage_size` trajectories
(the rollout batch), parked ones first. Without a budget a stage runs until its slowest sample
finishes, and a long tail leaves the batch nearly empty; with one, the tail is cut into chunks
and new prompts fill the batch (the paper reports ~1.7x faster RL steps).

A parked trajectory keeps its KV cache by default (`keep_cache`): the engine copies its slot out
(`LLMEngine.park`) and back in when it resumes, so it goes straight back to decoding. With
keep_cache=False it resumes instead as a new request whose prompt is prompt + output so far,
recomputed by a chunked prefill (no memory held, but the prefill costs grow with the length). Either
way the engine samples token by token exactly as before, so greedy trajectories are the same with
or without a budget; only the number of stages changes.
"""

import time
from collections import deque
from dataclasses import dataclass, field

from edgelm.engine import LLMEngine, SamplingParams


@dataclass
class Chunk:
    """Output tokens [start, end) of a trajectory, sampled by policy `version` in one stage."""

    start: int
    end: int
    version: int


@dataclass
class Trajectory:
    group_id: int
    index: int  # which of the group's G samples
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # behaviour log-prob of each output token
    chunks: list[Chunk] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS) or "length" once done
    text: str = ""
    parked: object = None  # the engine Sequence, with its saved cache, while parked (keep_cache)

    @property
    def is_done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.output_ids)


@dataclass
class Group:
    group_id: int
    prompt_ids: list[int]
    samples: list[Trajectory]

    @property
    def is_done(self) -> bool:
        return all(t.is_done for t in self.samples)


@dataclass
class RolloutStats:
    num_tokens: int = 0  # generated
    num_steps: int = 0  # engine steps (one batched decode each)
    num_stages: int = 0
    seconds: float = 0.0
    max_batch: int = 1

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds else 0.0

    @property
    def occupancy(self) -> float:
        """Mean fraction of the batch's rows that produced a token per engine step."""
        return self.num_tokens / (self.num_steps * self.max_batch) if self.num_steps else 0.0


class ChunkedRollout:
    """`add_prompt` queues a group of G samples; `run_stage` runs one stage and returns the groups
    it completed; `run` repeats stages until everything is done. Bump `policy_version` after each
    policy update: chunks record it, and the trainer weights chunks by it (see grpo.py)."""

    def __init__(
        self,
        engine: LLMEngine,
        num_samples: int = 4,
        budget: int | None = None,
        max_tokens: int = 64,
        stage_size: int | None = None,
        temperature: float = 1.0,
        ignore_eos: bool = False,
        seed: int = 0,
        keep_cache: bool = True,
    ):
        if budget is not None and budget <= 0:
            raise ValueError(f"the rollout budget must be a positive number of tokens, got {budget}")
        if num_samples <= 0 or max_tokens <= 0:
            raise ValueError(f"num_samples and max_tokens must be positive, got {num_samples}, {max_tokens}")
        self.engine, self.num_samples, self.budget, self.max_tokens = engine, num_samples, budget, max_tokens
        self.stage_size = stage_size or engine.scheduler.max_batch
        self.temperature, self.ignore_eos, self.seed = temperature, ignore_eos, seed
        self.keep_cache = keep_cache
        self.policy_version = 0
        self.waiting: deque[Group] = deque()  # not started
        self.parked: deque[Trajectory] = deque()  # started, out of budget last stage
        self.active: dict[int, Group] = {}  # started groups by id
        self.stats = RolloutStats(max_batch=engine.scheduler.max_batch)
        self._next_group = 0

    def add_prompt(self, prompt_ids: list[int], max_tokens: int | list[int] | None = None) -> int:
        """Queue G samples of a prompt (token ids); `max_tokens` may differ per sample. Returns the group id."""
        limits = (
            max_tokens if isinstance(max_tokens, list) else [max_tokens or self.max_tokens] * self.num_samples
        )
        if len(limits) != self.num_samples or min(limits) <= 0:
            raise ValueError(
                f"max_tokens must be positive, one per sample ({self.num_samples}), got {limits}"
            )
        self.engine.check_request(prompt_ids, SamplingParams(max_tokens=1))
        room = self.engine.model.context_length - len(prompt_ids)  # a resumed request must fit too
        gid, self._next_group = self._next_group, self._next_group + 1
        samples = [Trajectory(gid, i, list(prompt_ids), min(n, room)) for i, n in enumerate(limits)]
        self.waiting.append(Group(gid, list(prompt_ids), samples))
        return gid

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.parked)

    def run_stage(self) -> list[Group]:
        """Run one stage (parked samples first, then new groups, up to `stage_size`); returns the
        groups whose G samples are now all done."""
        start = time.perf_counter()
        self._run(self._take_stage())
        self.stats.seconds += time.perf_counter() - start
        self.stats.num_stages += 1
        done = [g for g in self.active.values() if g.is_done]
        for g in done:
            del self.active[g.group_id]
        return done

    def run(self) -> list[Group]:
        groups = []
        while self.has_work:
            groups += self.run_stage()
        return sorted(groups, key=lambda g: g.group_id)

    def _take_stage(self) -> list[Trajectory]:
        stage = [self.parked.popleft() for _ in range(min(len(self.parked), self.stage_size))]
        # whole groups only; a group larger than the stage still runs alone
        while self.waiting and (len(stage) + self.num_samples <= self.stage_size or not stage):
            group = self.waiting.popleft()
            self.active[group.group_id] = group
            stage += group.samples
        return stage

    def _params(self, t: Trajectory) -> SamplingParams:
        # recompute mode ends the request at the budget; keep_cache parks it from outside (_run)
        n = t.remaining if self.budget is None or self.keep_cache else min(self.budget, t.remaining)
        # seeded by position, so a sample's draws do not depend on where the stages cut it
        seed = hash((self.seed, t.group_id, t.index, len(t.output_ids))) & 0x7FFFFFFF
        return SamplingParams(n, self.temperature, seed=seed, ignore_eos=self.ignore_eos, logprobs=0)

    def _start(self, t: Trajectory) -> int:
        """Put a trajectory into the engine for this stage; returns its sequence id."""
        t.chunks.append(Chunk(len(t.output_ids), len(t.output_ids), self.policy_version))
        if t.parked is not None:
            seq, t.parked = t.parked, None
            self.engine.resume(seq)
            return seq.id
        return self.engine.add_request(t.prompt_ids + t.output_ids, self._params(t))

    def _run(self, stage: list[Trajectory]) -> None:
        assert not self.engine.has_work, "the rollout needs the engine to itself"
        by_seq = {self._start(t): t for t in stage}
        while self.engine.has_work:
            for out in self.engine.step():
                self._take(by_seq[out.seq_id], out)
            self.stats.num_steps += 1
            if self.keep_cache and self.budget is not None:
                self._park_spent(by_seq)

    def _park_spent(self, by_seq: dict[int, Trajectory]) -> None:
        """Park (with their caches) the running trajectories that used up this stage's budget."""
        for seq_id, t in list(by_seq.items()):
            chunk = t.chunks[-1]
            if not t.is_done and t.parked is None and chunk.end - chunk.start >= self.budget:
                t.parked = self.engine.park(seq_id)
                self.parked.append(t)
                del by_seq[seq_id]

    def _take(self, t: Trajectory, out) -> None:
        if out.token is not None:
            t.output_ids.append(out.token)
            t.logprobs.append(out.logprob.logprob)
            t.chunks[-1].end += 1
            t.text += out.text
            self.stats.num_tokens += 1
        if out.finish_reason is None:
            return
        if out.finish_reason == "length" and t.remaining > 0:
            self.parked.append(t)  # recompute mode, out of this stage's budget: resume next stage
        else:
            t.finish_reason = out.finish_reason
