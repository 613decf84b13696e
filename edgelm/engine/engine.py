"""The continuous-batching engine: sequences + scheduler + runner, joined by `step()`.

`LLMEngine` is synchronous and single-threaded (tests and batch jobs drive it directly);
`AsyncEngine` runs one on a background thread for the server, with an asyncio queue per request.
"""

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from edgelm.engine.runner import ModelRunner
from edgelm.engine.scheduler import Scheduler
from edgelm.engine.sequence import SamplingParams, Sequence, Status, StepOutput
from edgelm.generate import check_prompt

log = logging.getLogger("edgelm.engine")


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int = 0
    num_running: int = 0
    cache_bytes_in_use: int = 0  # keys/values the running sequences hold (what the budget counts)
    cache_bytes_capacity: int = 0  # the budget, max_cache_bytes
    cache_bytes_allocated: int = 0  # what the slot buffers occupy (rectangular, see runner.py)
    num_preempted: int = 0  # sequences sent back to wait so far (recomputed later)


class LLMEngine:
    """Continuous batching over one model: `add_request`, then `step()` until `has_work` is False.

    `max_cache_bytes` budgets the KV cache the running sequences hold; admission waits for room and
    growth past it preempts the newest sequence (recomputed later, output unchanged).
    """

    def __init__(self, model, max_batch: int = 8, max_cache_bytes: int = 1 << 30, prefill_chunk: int = 256):
        self.model, self.tokenizer = model, model.tokenizer
        self.runner = ModelRunner(model, max_batch)
        self.bytes_per_token = self.runner.bytes_per_token
        if max_cache_bytes < self.bytes_per_token:
            raise ValueError(
                f"max_cache_bytes {max_cache_bytes} holds no token ({self.bytes_per_token} B each)"
            )
        self.max_cache_bytes = max_cache_bytes
        self.scheduler = Scheduler(max_batch, max_cache_bytes // self.bytes_per_token, prefill_chunk)
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()

    def check_request(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """ValueError if the request can never run: bad sampling params, or a prompt too long."""
        params.check()
        check_prompt(len(prompt_ids), self.model.context_length)
        need = len(prompt_ids) * self.bytes_per_token
        if need > self.max_cache_bytes:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens, needing {need} bytes of KV cache, but the cache "
                f"budget is {self.max_cache_bytes} bytes; shorten the prompt or raise the budget"
            )

    def add_request(
        self, prompt_ids: Seq[int], params: SamplingParams | None = None, seq_id: int | None = None
    ) -> int:
        """Queue a prompt (token ids); returns its sequence id."""
        params = params or SamplingParams()
        self.check_request(prompt_ids, params)
        seq_id = next(self._ids) if seq_id is None else seq_id
        if seq_id in self.seqs:
            raise ValueError(f"sequence id {seq_id} is already in use")
        eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else ()
        context = self.model.context_length
        seq = Sequence(
            seq_id, list(prompt_ids), params, eos_ids=eos, tokenizer=self.tokenizer, context_length=context
        )
        self.seqs[seq_id] = seq
        self.scheduler.add(seq)
        return seq_id

    def abort(self, seq_id: int, reason: str = "abort") -> StepOutput | None:
        """Stop a sequence and free its slot and cache; returns its final output (None if unknown)."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        self.scheduler.abort(seq)
        self.runner.free(seq_id)
        return seq.finish(reason)

    def park(self, seq_id: int) -> Sequence:
        """Take a running sequence out between steps, keeping a copy of its KV cache; `resume`
        puts it back (chunk-wise rollout parks trajectories that used up a stage's budget)."""
        seq = self.seqs.pop(seq_id)
        seq.saved_kv = self.runner.save(seq_id)
        seq.num_cached = seq.saved_kv[0][0].shape[1] if seq.saved_kv is not None else 0
        self.scheduler.abort(seq)
        self.runner.free(seq_id)
        seq.status = Status.WAITING
        return seq

    def resume(self, seq: Sequence) -> None:
        """Queue a parked sequence again; its saved cache is restored when it is admitted, so only
        its last sampled token is fed (a decode, not a prefill)."""
        if seq.id in self.seqs:
            raise ValueError(f"sequence id {seq.id} is already in use")
        self.seqs[seq.id] = seq
        self.scheduler.add(seq)

    def abort_all(self, reason: str = "abort") -> list[StepOutput]:
        return [self.abort(seq_id, reason) for seq_id in list(self.seqs)]

    def step(self) -> list[StepOutput]:
        """Schedule, run the prompt chunks and one batched decode, sample; returns the outputs."""
        plan = self.scheduler.schedule()
        for seq in plan.evicted:
            self.runner.free(seq.id)
        logits = self.runner.execute(plan)  # (len(plan.sampling), V)
        outputs = plan.outputs + [self._sample(seq, logits[i : i + 1]) for i, seq in enumerate(plan.sampling)]
        for seq in self.scheduler.retire():
            self.runner.free(seq.id)
        self._forget([o.seq_id for o in outputs if o.finish_reason is not None])
        return outputs

    def _forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            del self.seqs[seq_id]

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> StepOutput:
        try:
            return seq.append_token(*seq.sample(logits))
        except Exception:  # one sequence's bad sampling state must not end the others
            log.exception("sampling failed for sequence %d", seq.id)
            return seq.finish("error")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def cache_bytes_in_use(self) -> int:
        return self.scheduler.num_cached_tokens * self.bytes_per_token

    def stats(self) -> EngineStats:
        return EngineStats(
            len(self.scheduler.waiting),
            len(self.scheduler.running),
            self.cache_bytes_in_use,
            self.max_cache_bytes,
            self.runner.cache.nbytes,
            self.scheduler.num_preempted,
        )


class AsyncEngine:
    """Runs an `LLMEngine` on a background thread for an asyncio server.

    Only the engine thread touches the engine: requests and aborts arrive through a thread-safe
    inbox, and each step's outputs reach the request's asyncio.Queue via loop.call_soon_threadsafe.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stats = engine.stats()  # refreshed by the engine thread after every step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="edgelm-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting + self._inbox.qsize()

    def submit(self, prompt_ids: Seq[int], params: Seq[SamplingParams]) -> tuple[list[int], asyncio.Queue]:
        """From the event loop: start one sequence per params (all share the prompt). Their
        StepOutputs arrive on the returned queue; each sequence's last has a finish_reason.
        Raises ValueError at once for a request that can never run."""
        for p in params:
            self.engine.check_request(prompt_ids, p)
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        ids = [next(self._ids) for _ in params]
        for seq_id, p in zip(ids, params):
            self._inbox.put(("add", seq_id, list(prompt_ids), p, loop, out))
        return ids, out

    def abort(self, seq_ids: Seq[int]) -> None:
        for seq_id in seq_ids:
            self._inbox.put(("abort", seq_id))

    def shutdown(self) -> None:
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while self._take_commands():
            if not self.engine.has_work:
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a failed forward: end what was in flight, keep serving
                log.exception("engine step failed")
                outputs = self.engine.abort_all("error")
            self._deliver(outputs)

    def _take_commands(self) -> bool:
        """Apply queued commands; block for one while the engine is idle. False on shutdown."""
        block = not self.engine.has_work
        while True:
            try:
                cmd = self._inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if cmd[0] == "stop":
                return False
            self._apply(cmd)
        self.stats = self.engine.stats()
        return True

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "abort":
            self._queues.pop(cmd[1], None)
            self.engine.abort(cmd[1])
            return
        _, seq_id, prompt_ids, params, loop, out = cmd
        self._queues[seq_id] = (loop, out)
        try:
            self.engine.add_request(prompt_ids, params, seq_id=seq_id)
        except Exception as e:  # checked in submit(), so only an engine-side surprise lands here
            log.exception("could not add sequence %d", seq_id)
            self._deliver([StepOutput(seq_id, None, str(e), "error", None, len(prompt_ids), 0)])

    def _deliver(self, outputs: list[StepOutput]) -> None:
        self.stats = self.engine.stats()
        for o in outputs:
            loop, out = self._queues.get(o.seq_id, (None, None))
            if out is None:
                continue
            if o.finish_reason is not None:
                del self._queues[o.seq_id]
            try:
                loop.call_soon_threadsafe(out.put_nowait, o)
            except RuntimeError:  # the loop has closed (server shutting down)
                pass
