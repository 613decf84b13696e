"""Which sequences run in the next engine step. Pure Python: no tensors, no model.

Policy, in the order `schedule()` applies it:
1. Room to grow: each running sequence will hold at most `num_tokens` cached tokens after this step
   (see `Sequence`). While their sum exceeds the KV budget, the most recently admitted sequence is
   preempted by recompute: its cache is dropped and it goes back to the front of the waiting queue
   with its generated tokens, to be prefilled again later (greedy output does not change).
2. Admission: FIFO, one sequence at a time, only when no prompt is mid-prefill, a slot is free
   (`max_batch`) and its whole prompt fits in the budget.
3. Work: one chunk of at most `prefill_chunk` prompt tokens for the prefilling sequence, plus one
   decode token for every other running sequence.
"""

from collections import deque
from dataclasses import dataclass, field

from edgelm.engine.sequence import Sequence, Status, StepOutput


@dataclass
class Plan:
    """One step's work. The runner feeds `prefill.token_ids[num_cached:prefill_end]` and one token per
    `decode` sequence; `evicted` sequences lost their cache and must give their slots back first."""

    prefill: Sequence | None = None
    prefill_end: int = 0
    decode: list[Sequence] = field(default_factory=list)
    evicted: list[Sequence] = field(default_factory=list)
    outputs: list[StepOutput] = field(default_factory=list)  # sequences the scheduler itself ended

    @property
    def sampling(self) -> list[Sequence]:
        """Sequences that get a next token this step, in the order the runner returns logits."""
        done = self.prefill is not None and self.prefill_end == self.prefill.num_tokens
        return ([self.prefill] if done else []) + self.decode


class Scheduler:
    def __init__(self, max_batch: int, max_cache_tokens: int, prefill_chunk: int):
        if max_batch <= 0 or prefill_chunk <= 0 or max_cache_tokens <= 0:
            raise ValueError("max_batch, prefill_chunk and the cache budget must be positive")
        self.max_batch, self.max_cache_tokens, self.prefill_chunk = max_batch, max_cache_tokens, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first

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
        self._admit()
        plan.prefill = next((s for s in self.running if s.is_prefilling), None)
        if plan.prefill is not None:
            plan.prefill_end = min(plan.prefill.num_cached + self.prefill_chunk, plan.prefill.num_tokens)
        plan.decode = [s for s in self.running if not s.is_prefilling]
        return plan

    def _make_room(self, plan: Plan) -> None:
        while sum(s.num_tokens for s in self.running) > self.max_cache_tokens:
            victim = self.running.pop()
            plan.evicted.append(victim)
            if self.running:
                victim.preempt()
                self.waiting.appendleft(victim)
            else:  # alone and still too long: the budget caps its length
                plan.outputs.append(victim.finish("length"))

    def _admit(self) -> None:
        if not self.waiting or len(self.running) >= self.max_batch:
            return
        if any(s.is_prefilling for s in self.running):
            return  # one prompt at a time keeps each step's prefill to one chunk
        held = sum(s.num_tokens for s in self.running)
        if held + self.waiting[0].num_tokens <= self.max_cache_tokens:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)

    def retire(self) -> list[Sequence]:
        """Remove finished sequences from the running set; returns them (their slots are to free)."""
        done = [s for s in self.running if s.is_finished]
        self.running = [s for s in self.running if not s.is_finished]
        return done
