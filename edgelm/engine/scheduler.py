"""Which sequences run in the next engine step. Pure Python: no tensors, no model.

Policy, in the order `schedule()` applies it:
1. Room to grow: each running sequence will hold at most `num_tokens` cached tokens after this step
   (see `Sequence`). While their sum exceeds the KV budget, the most recently admitted sequence is
   preempted by recompute: its cache is dropped and it goes back to the front of the waiting queue
   with its generated tokens, to be prefilled again later (greedy output does not change).
2. Chunked prefill: a step feeds at most `prefill_chunk` prompt tokens in all. Prompts already
   mid-prefill go first, one chunk each; the rest of the allowance admits waiting sequences, FIFO,
   while a slot is free (`max_batch`) and the whole prompt fits in the KV budget. A long prompt
   thus takes several steps, and a burst of short ones shares a step.
3. Decode: every running sequence past its prompt feeds one token, in the same step (so does a
   parked sequence resumed with its saved cache: it has only its last token to feed).
"""

from collections import deque
from dataclasses import dataclass, field

from edgelm.engine.sequence import Sequence, Status, StepOutput


@dataclass
class Plan:
    """One step's work. For each (seq, end) in `prefills` the runner feeds seq.token_ids[num_cached:end];
    each `decode` sequence feeds one token. `evicted` sequences lost their cache: free their slots first."""

    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    evicted: list[Sequence] = field(default_factory=list)
    outputs: list[StepOutput] = field(default_factory=list)  # sequences the scheduler itself ended

    @property
    def sampling(self) -> list[Sequence]:
        """Sequences that get a next token this step, in the order the runner returns logits."""
        return [seq for seq, end in self.prefills if end == seq.num_tokens] + self.decode


class Scheduler:
    def __init__(self, max_batch: int, max_cache_tokens: int, prefill_chunk: int):
        if max_batch <= 0 or prefill_chunk <= 0 or max_cache_tokens <= 0:
            raise ValueError("max_batch, prefill_chunk and the cache budget must be positive")
        self.max_batch, self.max_cache_tokens, self.prefill_chunk = max_batch, max_cache_tokens, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preempted = 0

    @property
    def num_cached_tokens(self) -> int:
        return sum(s.num_cached for s in self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> Plan:
        plan = Plan()
        self._make_room(plan)
        plan.decode = [s for s in self.running if not s.is_prefilling]
        prefilling = [s for s in self.running if s.is_prefilling]
        admitted = self._admit()
        plan.decode += [s for s in admitted if not s.is_prefilling]  # resumed with their cache
        allowance = self.prefill_chunk
        for seq in prefilling + [s for s in admitted if s.is_prefilling]:
            if allowance <= 0:
                break
            end = min(seq.num_cached + allowance, seq.num_tokens)
            plan.prefills.append((seq, end))
            allowance -= end - seq.num_cached
        return plan

    def _make_room(self, plan: Plan) -> None:
        while sum(s.num_tokens for s in self.running) > self.max_cache_tokens:
            victim = self.running.pop()
            plan.evicted.append(victim)
            if self.running:
                victim.preempt()
                self.waiting.appendleft(victim)
                self.num_preempted += 1
            else:  # alone and still too long: the budget caps its length
                plan.outputs.append(victim.finish("length"))

    def _admit(self) -> list[Sequence]:
        """Admit waiting sequences (FIFO) into this step's leftover prefill allowance."""
        allowance = self.prefill_chunk - sum(
            s.num_tokens - s.num_cached for s in self.running if s.is_prefilling
        )
        held = sum(s.num_tokens for s in self.running)
        admitted = []
        while self.waiting and allowance > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if held + seq.num_tokens > self.max_cache_tokens:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            held += seq.num_tokens
            allowance -= seq.num_tokens - seq.num_cached
        return admitted

    def retire(self) -> list[Sequence]:
        """Remove finished sequences from the running set; returns them (their slots are to free)."""
        done = [s for s in self.running if s.is_finished]
        self.running = [s for s in self.running if not s.is_finished]
        return done
