"""Speculative decoding as a generator that yields exactly what `edgelm.generate.generate_step`
yields: draft k tokens, verify them in one target forward over [last token, d_1..d_k], keep the
accepted prefix plus one target token, roll the target cache back over the rest.

A forward over k + 1 tokens costs little more than over one on a memory-bound device (the weights
are read once), so every accepted draft token is a decode step nearly for free.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from edgelm.generate import PREFILL_CHUNK, check_prompt, prefill
from edgelm.sampling import LogitsProcessor
from edgelm.speculative.acceptance import (
    SamplingParams,
    accept_greedy,
    accept_sampled,
    accept_tree,
    match_width,
)
from edgelm.speculative.proposers import Draft, Proposer, is_trimmable


@dataclass
class SpeculativeStats:
    num_steps: int = 0  # target forwards after the prefill (verify passes, and plain steps when k = 0)
    num_proposed: int = 0  # draft tokens sent to verification
    num_accepted: int = 0  # draft tokens the target kept
    num_tokens: int = 0  # tokens yielded

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_proposed += num_proposed
        self.num_accepted += num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / max(self.num_proposed, 1)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per target forward: accepted drafts + the target's own token (plain decode: 1)."""
        return (self.num_accepted + self.num_steps) / max(self.num_steps, 1)


class DraftLength:
    """The draft length k for the next step, from the running per-token acceptance rate α.

    With acceptance α, a draft of k tokens yields E(k) = (1 − α^(k+1)) / (1 − α) tokens per verify
    (Leviathan et al. 2023, eq. 1) and costs about 1 + k·(c + β) target forwards, c being the
    proposer's cost per token and β the verify pass's extra cost per token. Pick the k in
    0..num_draft maximising E(k) / cost(k) (k = 0 is plain decoding: E = 1, cost 1). α is estimated
    geometrically: a step that accepted n of k tested n + 1 tokens (n if all passed); counts decay
    so α tracks the text, and after `probe_every` plain steps one token is drafted to re-measure.
    """

    def __init__(self, num_draft: int, cost: float, adaptive: bool, verify_cost: float = 0.05):
        self.num_draft, self.cost, self.adaptive = num_draft, cost + verify_cost, adaptive
        self.decay, self.probe_every, self.num_plain = 0.9, 8, 0
        self.passed, self.tested = 3.0, 4.0  # prior α = 0.75, forgotten after a few steps

    def update(self, k: int, n: int) -> None:
        self.passed = self.decay * self.passed + n
        self.tested = self.decay * self.tested + n + (n < k)

    def next(self) -> int:
        if not self.adaptive:
            return self.num_draft
        a = min(self.passed / self.tested, 0.999)
        gain = [(1 - a ** (k + 1)) / (1 - a) / (1 + k * self.cost) for k in range(self.num_draft + 1)]
        k = max(range(len(gain)), key=gain.__getitem__)
        self.num_plain = self.num_plain + 1 if k == 0 else 0
        return 1 if self.num_plain > self.probe_every else k


@torch.inference_mode()
def speculative_generate_step(
    model,
    prompt: Sequence[int] | torch.Tensor,
    proposer: Proposer,
    *,
    num_draft: int = 4,
    sampling: SamplingParams | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = 256,
    adaptive: bool = True,
    cache: list | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    stats: SpeculativeStats | None = None,
    verify_cost: float = 0.05,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, target logits (V,) it was chosen from) until max_tokens or the context is
    full, like `generate_step`. Greedy (the default sampling) yields the very same tokens; with
    temperature > 0 each token follows the target's distribution exactly (not the same random
    stream). `num_draft` is k, the most draft tokens per verify; `adaptive` picks 0..k each step
    from the acceptance rate and the proposer's cost (`DraftLength`). `stats`, when given, is
    updated as tokens are yielded. The sampler is `sampling` (settings as data: the acceptance
    rule needs distributions, not just a sampled token).
    `verify_cost` is a verify pass's extra cost per draft token, in target forwards: measure it
    as (t(k+1 tokens) / t(1 token) − 1) / k (`benchmarks/speculative.py --cost`).
    """
    if num_draft <= 0:
        raise ValueError(f"num_draft must be a positive number of draft tokens, got {num_draft}")
    sampling, stats = sampling or SamplingParams(), stats if stats is not None else SpeculativeStats()
    proposer.bind(model)
    tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    check_prompt(tokens.shape[1], model.context_length)
    cache = cache if cache is not None else model.make_cache()
    history = tokens[0].tolist()  # the prompt and every token yielded; the cache lacks the last one
    budget = min(max_tokens, model.context_length - len(history))
    if budget <= 0:
        return
    logits = process(history, [], prefill(model, tokens, cache, prefill_chunk), logits_processors)
    token = choose(logits[0], sampling)
    history.append(token)
    stats.num_tokens += 1
    yield token, logits[0]
    lengths, emitted = DraftLength(num_draft, proposer.cost, adaptive, verify_cost), 1
    while emitted < budget:
        k = min(lengths.next(), budget - emitted - 1)  # never pass the budget
        draft = proposer.propose(history, k, sampling) if k > 0 else Draft([])
        if draft.parents is not None and not can_verify_tree(model, cache):
            draft = draft.chain()  # this target verifies chains only: keep the first-child path
        if draft.parents is None:
            n, rows, token = verify(model, cache, history, draft, sampling, logits_processors)
            kept, on_chain = draft.tokens[:n], n
        else:
            path, rows, token = verify_tree(model, cache, history, draft, sampling, logits_processors)
            kept, on_chain = [draft.tokens[i] for i in path], chain_length(path)
        n = len(kept)
        proposer.accept(on_chain)
        if draft.tokens:
            lengths.update(draft.depth, n)
        stats.record(len(draft.tokens), n)
        for t, row in zip([*kept, token], rows):
            history.append(t)
            emitted += 1
            stats.num_tokens += 1
            yield t, row
    model(torch.tensor([history[-1:]]), cache)  # as generate_step: the cache ends holding every token


def verify(model, cache: list, history: list[int], draft: Draft, sampling: SamplingParams, processors):
    """One target forward over [last token, d_1..d_k] -> (accepted n, logits rows (n+1, V) of the
    kept tokens, the target's token after them); the cache ends holding history + d_1..d_n."""
    k = len(draft.tokens)
    snapshots = None if is_trimmable(cache) else [c.snapshot() for c in cache]
    logits = model(torch.tensor([history[-1:] + draft.tokens]), cache)[0]  # (k+1, V)
    logits = process(history, draft.tokens, logits, processors)
    if sampling.is_greedy:  # the rule and its proof: edgelm/speculative/acceptance.py
        n, token = accept_greedy(draft.tokens, logits)
    else:
        q = None if draft.probs is None else match_width(draft.probs, logits.shape[-1])
        n, token = accept_sampled(draft.tokens, q, sampling.probs(logits), sampling)
    rollback(model, cache, snapshots, k - n, history[-1:] + draft.tokens[:n])
    return n, logits[: n + 1], token


def verify_tree(model, cache: list, history: list[int], draft: Draft, sampling: SamplingParams, processors):
    """One target forward over [last token] + the draft tree's nodes (tree positions and an
    ancestor mask) -> (accepted node ids from the root down, their logits rows (n+1, V) with the
    root's first, the target's token after them); the cache ends holding history + that path."""
    start = cache[0].offset
    tree = torch.tensor([-1] + [p + 1 for p in draft.parents])  # node i is verify row i + 1
    logits = model(torch.tensor([history[-1:] + draft.tokens]), cache, tree=tree)[0]  # (n+1, V)
    if processors:  # row j as plain decoding would see it: after history + the path to its node
        paths = [[]] + [draft.path_tokens(i) for i in range(len(draft.tokens))]
        logits = torch.cat([process(history + path, [], logits[j : j + 1], processors) for j, path in enumerate(paths)])
    if sampling.is_greedy:
        path, token = accept_tree(draft.tokens, draft.parents, None, logits, sampling)
    else:
        q = None if draft.probs is None else match_width(draft.probs, logits.shape[-1])
        path, token = accept_tree(draft.tokens, draft.parents, q, sampling.probs(logits), sampling)
    rows = [0] + [i + 1 for i in path]
    for c in cache:
        c.keep(start, rows)
    return path, logits[rows], token


def can_verify_tree(model, cache: list) -> bool:
    supports = getattr(model, "supports_tree", None)
    return supports is not None and supports(cache)


def chain_length(path: list[int]) -> int:
    """How many accepted nodes lie on the draft's first-child chain (nodes 0, 1, 2, ...)."""
    n = 0
    while n < len(path) and path[n] == n:
        n += 1
    return n


def rollback(model, cache: list, snapshots: list | None, num_drop: int, kept: list[int]) -> None:
    """Forget the last `num_drop` positions: trim a KV cache; restore a snapshot and re-feed the
    kept tokens for a state that cannot be trimmed."""
    if num_drop == 0:
        return
    if snapshots is None:
        for c in cache:
            c.trim(num_drop)
        return
    for c, s in zip(cache, snapshots):
        c.restore(s)
    model(torch.tensor([kept]), cache)


def process(history: list[int], draft: list[int], logits: torch.Tensor, processors) -> torch.Tensor:
    """Apply logits processors to each row i as generate_step would: with history + draft[:i] seen."""
    if not processors:
        return logits
    rows = []
    for i in range(logits.shape[0]):
        seen, row = torch.tensor([history + draft[:i]]), logits[i : i + 1]
        for p in processors:
            row = p(seen, row)
        rows.append(row)
    return torch.cat(rows)


def choose(logits: torch.Tensor, sampling: SamplingParams) -> int:
    """The token plain decoding would pick from (V,) logits."""
    return int(logits.argmax()) if sampling.is_greedy else sampling.draw(sampling.probs(logits))
