"""Draft proposers: where speculative decoding's guesses come from.

Every proposer answers `propose(context, k, sampling) -> Draft` (up to k ids, and for sampling the
draft distributions q they were drawn from) and hears `accept(n)` after the target's verify pass,
so a model proposer can roll its own cache back. `bind(target)` checks the proposer fits the
target and sizes its `cost` (one drafted token's time over one target forward), which the
adaptive draft length uses.

- `DraftModelProposer(draft)`: any model with the target's tokenizer. A quantized copy of the
  target is the "self-quant" draft: `DraftModelProposer(quantize_model(load(path), "int4"))`.
- `LayerSkipProposer(model, num_layers)`: the target's first layers + its final norm + LM head.
- `NgramProposer(n_max)`: prompt lookup, copying what followed the last n tokens earlier on.
Model proposers take `frspec_ids` (FR-Spec): draft only over those LM-head rows.

Tree drafting: model proposers take `branches` (top-b tokens per depth: the runners-up become
leaves beside the chain) and `NgramProposer` takes `branches` (several distinct continuations
merged into a trie); the target verifies the whole tree in one forward with an ancestor mask.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgelm.cache import KVCache
from edgelm.generate import prefill
from edgelm.speculative.acceptance import SamplingParams, point_mass
from edgelm.speculative.frspec import module_view, restrict_lm_head

PROBE_TEXTS = ("Hello, world! 123", "def f(x):\n    return x * 2", " The quick brown fox.")


@dataclass
class Draft:
    """A chain d_1..d_k, or a tree when `parents` is set: node i's parent is node parents[i] (-1: the
    last context token). A tree lists its first-child chain first (nodes 0..depth-1, the path a
    chain-only target verifies), and only a first child may be drawn from its q row: the others
    are point masses (one-hot rows), see `acceptance.accept_tree`."""

    tokens: list[int]  # up to k proposed ids (possibly none); a tree's nodes
    probs: torch.Tensor | None = None  # (len(tokens), V) draft distributions q; None = point masses
    parents: list[int] | None = None  # None: a chain

    @property
    def depth(self) -> int:
        """The first-child chain's length (len(tokens) for a chain)."""
        if self.parents is None:
            return len(self.tokens)
        n = 0
        while n < len(self.parents) and self.parents[n] == n - 1:
            n += 1
        return n

    def chain(self) -> "Draft":
        """The first-child chain alone, as a chain draft."""
        n = self.depth
        return Draft(self.tokens[:n], None if self.probs is None else self.probs[:n])

    def path_tokens(self, i: int) -> list[int]:
        """The tokens from the root's first child down to node i."""
        path = []
        while i >= 0:
            path.append(self.tokens[i])
            i = self.parents[i]
        return path[::-1]


class Proposer:
    """Base: a proposer that never proposes. Subclasses override `propose`, maybe `accept`/`bind`."""

    cost: float = 0.0

    def bind(self, target) -> None:
        """Check this proposer can draft for `target`; called once per generation."""

    def propose(
        self, context: Sequence[int] | torch.Tensor, k: int, sampling: SamplingParams | None = None
    ) -> Draft:
        return Draft([])

    def accept(self, num_accepted: int) -> None:
        """The target kept the first `num_accepted` tokens of the last draft."""


class NgramProposer(Proposer):
    """Prompt-lookup decoding: find the most recent earlier occurrence of the context's last n
    tokens (n from n_max down to n_min) and propose the k tokens that followed it."""

    def __init__(self, n_max: int = 3, n_min: int = 1, branches: int = 1):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        self.n_max, self.n_min, self.branches = n_max, n_min, branches

    def propose(self, context, k, sampling=None) -> Draft:
        """The continuation of the most recent longest match; with `branches` > 1, a tree (a trie)
        of up to that many distinct continuations, longer matches and more recent ones first."""
        ctx = torch.as_tensor(context, dtype=torch.long).reshape(-1)
        found: list[list[int]] = []
        for n in range(min(self.n_max, ctx.numel() - 1), self.n_min - 1, -1):
            windows = ctx[:-1].unfold(0, n, 1)  # (L-n, n): every earlier n-gram, ending before the last token
            for hit in (windows == ctx[-n:]).all(-1).nonzero().flatten().flip(0).tolist():
                cont = ctx[hit + n : hit + n + k].tolist()
                if cont and cont not in found:
                    found.append(cont)
                if len(found) == self.branches:
                    return trie(found)
        return trie(found)


def trie(sequences: list[list[int]]) -> Draft:
    """Token sequences (continuations of the same context) merged into a draft tree; the first
    sequence is the first-child chain. One sequence is a chain draft."""
    if len(sequences) <= 1:
        return Draft(sequences[0] if sequences else [])
    tokens, parents, index = [], [], {}  # index: (parent node, token) -> node
    for seq in sequences:
        node = -1
        for t in seq:
            if (node, t) not in index:
                index[node, t] = len(tokens)
                tokens.append(t)
                parents.append(node)
            node = index[node, t]
    return Draft(tokens, None, parents)


class ModelProposer(Proposer):
    """Drafts with a model (B=1) and its own cache, kept in step with the context it is shown:
    each `propose` feeds only the tokens the cache lacks, and `accept` drops the rejected drafts
    (trimming a KV cache; restoring a snapshot and re-feeding for a state that cannot trim)."""

    def __init__(
        self,
        model: nn.Module,
        frspec_ids: torch.Tensor | None = None,
        cost: float | None = None,
        branches: Sequence[int] = (),
        confident: float = 1.0,
    ):
        if any(b < 1 for b in branches):
            raise ValueError(f"branches must be >= 1 per depth, got {list(branches)}")
        if not 0 < confident <= 1:
            raise ValueError(f"confident must be in (0, 1], got {confident}")
        # Tree drafting: at depth i the draft's top branches[i] tokens, its own pick (the chain,
        # fed on) and branches[i] - 1 runners-up as leaves that the target verifies alongside,
        # unless the draft gives its top token probability >= `confident` there (EAGLE-2's point:
        # spend verify rows where the draft is unsure).
        self.branches, self.confident = tuple(branches), confident
        self.fixed_cost = cost  # None: estimate from weight bytes in bind()
        self.vocab_width = vocab_rows(model)  # q's width: the draft's full vocabulary
        self.model = model if frspec_ids is None else restrict_lm_head(model, frspec_ids)
        self.ids = None if frspec_ids is None else torch.as_tensor(frspec_ids, dtype=torch.long)
        self.cache = self.model.make_cache()
        self.cached: list[int] = []  # the ids the draft cache holds, in order
        self.fed: list[int] = []  # draft tokens fed since the last accept()
        self.snapshots: list | None = None

    def bind(self, target) -> None:
        if self.vocab_width > vocab_rows(target):
            raise ValueError(
                f"the draft scores {self.vocab_width} tokens but the target only {vocab_rows(target)}"
            )
        estimate = forward_bytes(self.model) / forward_bytes(target)
        self.cost = estimate if self.fixed_cost is None else self.fixed_cost

    @torch.inference_mode()
    def propose(self, context, k, sampling=None) -> Draft:
        context = context.reshape(-1).tolist() if isinstance(context, torch.Tensor) else list(context)
        logits = self._sync(context)
        self.snapshots = None if is_trimmable(self.cache) else [c.snapshot() for c in self.cache]
        tokens, probs, leaves = [], [], []  # leaves: (parent node, token)
        for i in range(k):
            token, q = self._pick(logits, sampling)
            tokens.append(token)
            probs.append(q)
            if i < len(self.branches) and self.branches[i] > 1 and self._unsure(logits):
                leaves += [(i - 1, t) for t in self._runners_up(logits, token, self.branches[i] - 1)]
            if i < k - 1:  # the last draft token is fed next time, with the target's token after it
                logits = self._feed([token])
        self.fed = tokens[:-1]
        greedy = sampling is None or sampling.is_greedy
        if not leaves:
            return Draft(tokens, None if greedy else torch.stack(probs))
        if not greedy:  # leaves are point masses (one-hot q rows)
            probs += [point_mass(t, probs[0]) for _, t in leaves]  # q rows span vocab_width
        parents = list(range(-1, k - 1)) + [p for p, _ in leaves]
        return Draft(tokens + [t for _, t in leaves], None if greedy else torch.stack(probs), parents)

    def _unsure(self, logits: torch.Tensor) -> bool:
        return self.confident >= 1 or float(logits.float().softmax(-1).max()) < self.confident

    def _runners_up(self, logits: torch.Tensor, token: int, m: int) -> list[int]:
        """The m highest-scoring ids of (V_draft,) logits other than `token` (real ids)."""
        top = [self._token(j) for j in logits.topk(min(m + 1, logits.numel())).indices.tolist()]
        return [t for t in top if t != token][:m]

    @torch.inference_mode()
    def accept(self, num_accepted: int) -> None:
        keep, fed, self.fed = min(num_accepted, len(self.fed)), self.fed, []
        if keep == len(fed):
            return
        if self.snapshots is None:
            self._trim(len(fed) - keep)
            return
        for c, s in zip(self.cache, self.snapshots):
            c.restore(s)
        del self.cached[len(self.cached) - len(fed) :]
        if keep:
            self._feed(fed[:keep])

    def _sync(self, context: list[int]) -> torch.Tensor:
        """Bring the cache to a prefix of the context, feed the rest; -> logits (V_draft,) after it."""
        # Always re-feed at least the last token: we need the logits after it.
        common = min(common_prefix(context, self.cached), len(context) - 1)
        self._trim(len(self.cached) - common)
        return self._feed(context[len(self.cached) :])

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        logits = prefill(self.model, torch.tensor([tokens]), self.cache)  # (1, V_draft)
        self.cached += tokens
        return logits[0]

    def _trim(self, n: int) -> None:
        if n <= 0:
            return
        try:
            if not is_trimmable(self.cache):
                raise ValueError("a recurrent state cannot trim")
            for c in self.cache:
                c.trim(n)
            del self.cached[len(self.cached) - n :]
        except ValueError:  # the context changed beyond what the cache can undo: start over
            self.cache, self.cached = self.model.make_cache(), []

    def _pick(self, logits: torch.Tensor, sampling: SamplingParams | None) -> tuple[int, torch.Tensor | None]:
        """(V_draft,) logits -> (token id, q over the full vocabulary or None when greedy)."""
        if sampling is None or sampling.is_greedy:
            return self._token(int(logits.argmax())), None
        p = sampling.probs(logits)
        j = sampling.draw(p)
        if self.ids is None:
            return j, p
        q = p.new_zeros(self.vocab_width).index_copy_(0, self.ids, p)  # q = 0 outside V_high
        return self._token(j), q

    def _token(self, j: int) -> int:
        return j if self.ids is None else int(self.ids[j])


class DraftModelProposer(ModelProposer):
    """A separate draft model sharing the target's tokenizer (a smaller sibling, or a quantized
    copy of the target: self-quant)."""

    def bind(self, target) -> None:
        check_same_tokenizer(target.tokenizer, self.model.tokenizer)
        super().bind(target)


class LayerSkipProposer(ModelProposer):
    """The target's first `num_layers` decoder layers, then its final norm and LM head (early
    exit as a draft; no extra weights). Works for any model laid out as `model.model.layers`."""

    def __init__(
        self,
        model: nn.Module,
        num_layers: int,
        frspec_ids: torch.Tensor | None = None,
        cost: float | None = None,
        branches: Sequence[int] = (),
        confident: float = 1.0,
    ):
        super().__init__(first_layers(model, num_layers), frspec_ids, cost, branches, confident)


def first_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """A view of `model` running only its first `num_layers` layers (weights shared)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(  # noqa: TRY004 -- the user chose a model this proposer cannot cut
            f"layer skipping needs a model laid out as model.model.layers; {type(model).__name__} is not"
        )
    if not 0 < num_layers < len(layers):
        raise ValueError(
            f"num_layers must be in 1..{len(layers) - 1} for this {len(layers)}-layer model, got {num_layers}"
        )
    inner = module_view(model.model)
    inner.layers = nn.ModuleList(list(layers)[:num_layers])
    view = module_view(model)
    view.model = inner
    return view


def is_trimmable(cache: list) -> bool:
    """KV caches (plain and sliding-window) trim a few positions; other states (Mamba's) cannot."""
    return all(isinstance(c, KVCache) for c in cache)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared in C
        return n
    return next(i for i in range(n) if a[i] != b[i])


def vocab_rows(model: nn.Module) -> int:
    """The width of the model's logits (the LM head's rows; may exceed the tokenizer's vocabulary)."""
    head = getattr(model, "lm_head", None)
    return int(head.out_features) if hasattr(head, "out_features") else int(model.config.vocab_size)


def forward_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: the layers and the LM head (decode is memory bound)."""
    parts = [getattr(model, "layers", []), getattr(model, "lm_head", None)]
    tensors = {id(t): t for m in parts if m is not None for t in [*m.parameters(), *m.buffers()]}
    return sum(t.nbytes for t in tensors.values()) or 1


def check_same_tokenizer(target, draft) -> None:
    """ValueError naming the first difference between the two vocabularies."""
    if target is None or draft is None:
        if target is not draft:
            raise ValueError("only one of the target and the draft has a tokenizer; cannot check they match")
        return
    if target.vocab_size != draft.vocab_size:
        raise ValueError(
            f"tokenizer mismatch: the target's vocabulary has {target.vocab_size} tokens, the draft's "
            f"{draft.vocab_size}; speculative decoding needs the same tokenizer"
        )
    V = target.vocab_size
    for i in sorted({0, 1, 2, V // 3, V // 2, V - 1, *range(0, V, max(1, V // 61))}):
        if target.id_to_token(i) != draft.id_to_token(i):
            raise ValueError(
                f"tokenizer mismatch: id {i} is {target.id_to_token(i)!r} for the target but "
                f"{draft.id_to_token(i)!r} for the draft"
            )
    for text in PROBE_TEXTS:
        if target.encode(text) != draft.encode(text):
            raise ValueError(f"tokenizer mismatch: the two tokenizers encode {text!r} differently")
