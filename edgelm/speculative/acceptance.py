"""The acceptance rule of speculative decoding, greedy and sampled, and the sampling parameters
both the draft and the target use.

Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al. 2023): the draft proposes x_1..x_k with x_i ~ q_i, the target
scores all k + 1 positions in one forward, giving p_1..p_{k+1}. For i = 1..k accept x_i with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit one token from the residual
r_i = norm(max(p_i − q_i, 0)) and stop; if all k are accepted emit a bonus token from p_{k+1}.
Every emitted token is distributed exactly as p (their Theorem 3.5):

    P(y) = q(y) · min(1, p(y)/q(y))  +  (1 − Σ_x min(p(x), q(x))) · r(y)
         = min(p(y), q(y))           +  max(p(y) − q(y), 0)              = p(y)

since Σ_x max(p(x) − q(x), 0) = 1 − Σ_x min(p(x), q(x)) is exactly r's normaliser.
A deterministic proposer (n-gram) is the point mass q = δ_x: accept with probability p(x); the
residual is p with x removed. FR-Spec drafts over V_high only, so q = 0 outside it: those tokens
can only come from the residual, and nothing else changes. Greedy decoding is the limit
p = δ_argmax: accept while x_i == argmax p_i, then emit argmax p_{n+1}.

A draft tree gives a node several children. `accept_tree` walks down from the root trying a
node's children in order against the current target distribution r (p at first): child x with
draft distribution q is kept with probability min(1, r(x)/q(x)), otherwise r becomes
norm(max(r − q, 0)) and the next child is tried; with no child left it emits a token from r. Each
try is the rule above with r as its target, so the emitted token follows r, hence p, exactly
(SpecInfer, Miao et al. 2024, multi-step speculative sampling). This needs every child but the
first to be a point mass fixed before verification (top tokens, n-gram continuations): only the
first child may be drawn from q, since a later child's acceptance must not depend on earlier
tries. The proposers build trees that way.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgelm.sampling import apply_min_p, apply_top_k, apply_top_p, check_sampling_args


@dataclass(frozen=True)
class SamplingParams:
    """What `make_sampler` takes, as data: speculative sampling needs the distributions, not just
    a sampled token. `temperature == 0` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_p, self.top_k, self.min_p)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (..., V) float32 probabilities, warped exactly as `make_sampler` does."""
        logits = apply_top_k(logits.float() / self.temperature, self.top_k)
        return apply_min_p(apply_top_p(logits, self.top_p), self.min_p).softmax(-1)

    def draw(self, probs: torch.Tensor) -> int:
        """One id from a (V,) distribution."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


def accept_greedy(draft: Sequence[int], logits: torch.Tensor) -> tuple[int, int]:
    """draft (k ids), target logits (k+1, V) -> (accepted n, the target's token after them)."""
    target = logits.argmax(-1)  # (k+1,)
    n = 0
    while n < len(draft) and draft[n] == int(target[n]):
        n += 1
    return n, int(target[n])


def point_mass(x: int, like: torch.Tensor) -> torch.Tensor:
    """δ_x: a one-hot distribution shaped and typed like `like` (V,), the q of a fixed draft token."""
    return torch.zeros_like(like).index_fill_(0, torch.tensor([x]), 1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p − q, 0)) for (V,) distributions; p itself if they are equal up to rounding."""
    r = (p - q).clamp_(min=0)
    total = r.sum()
    return r / total if total > 0 else p


def accept_sampled(
    draft: Sequence[int], q: torch.Tensor | None, p: torch.Tensor, sampling: SamplingParams
) -> tuple[int, int]:
    """Leviathan et al. Algorithm 1 (see the module docstring).

    draft (k ids), q (k, V) draft distributions or None for point masses, p (k+1, V) target
    distributions -> (accepted n, the token emitted after them).
    """
    for i, x in enumerate(draft):
        qx = 1.0 if q is None else float(q[i, x])
        if sampling.uniform() * qx < float(p[i, x]):  # u < p(x)/q(x), without dividing by 0
            continue
        qi = point_mass(x, p[i]) if q is None else q[i]
        return i, sampling.draw(residual(p[i], qi))
    return len(draft), sampling.draw(p[len(draft)])


def match_width(q: torch.Tensor, width: int) -> torch.Tensor:
    """Pad draft distributions (k, Vd) with zeros to the target's logits width (padded vocabularies)."""
    if q.shape[-1] == width:
        return q
    assert q.shape[-1] < width, "draft vocabulary wider than the target's (bind() should refuse it)"
    return torch.nn.functional.pad(q, (0, width - q.shape[-1]))


def accept_tree(
    tokens: Sequence[int],
    parents: Sequence[int],
    q: torch.Tensor | None,
    p: torch.Tensor,
    sampling: SamplingParams,
) -> tuple[list[int], int]:
    """A draft tree's acceptance (see the module docstring).

    tokens/parents (n,) the nodes (parent -1: a child of the root, the last accepted token;
    parents first); q (n, V) the distribution each node was drawn from (a one-hot row for a point
    mass) or None for all point masses; p (n + 1, V) target distributions (row 0 the root's, row
    1 + i node i's), or for greedy the target logits -> (accepted node ids from the root down, the
    token emitted after them).
    """
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    path, node = [], -1
    while True:
        row = p[node + 1]
        if sampling.is_greedy:
            target = int(row.argmax())
            node = next((c for c in children.get(node, []) if tokens[c] == target), None)
            if node is None:
                return path, target
            path.append(node)
            continue
        r, kept = row, None
        for c in children.get(node, []):
            x = tokens[c]
            qx = 1.0 if q is None else float(q[c, x])
            if sampling.uniform() * qx < float(r[x]):  # u < r(x)/q(x)
                kept = c
                break
            qc = point_mass(x, r) if q is None else q[c]
            r = residual(r, qc)
        if kept is None:
            return path, sampling.draw(r)
        path.append(kept)
        node = kept
