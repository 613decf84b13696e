"""Fine-grained mixture of experts (Granite MoE / Granite 4.0-H) and its shared expert.

Shapes: T tokens (B·L flattened), E experts, k experts per token, I expert width.

    logits = router(x)                   (T, E)
    top-k on the logits; weights = softmax over the k chosen only
    expert e: output_linear[e] · (silu(gate) * up),  gate | up = input_linear[e] · x
    y = Σ_k weight · expert(x)  (+ shared_mlp(x) in the hybrid models: added, not gated)

Tokens are grouped by expert (one sort), so each active expert runs one matmul over all of its
tokens; `moe_reference` is the per-token loop it is tested against.

Quantized (`quantize_model` int8/int4): `input_linear` / `output_linear` become
`QuantizedExperts` (edgelm/quant/linear.py), one Int8Linear / Int4Linear per expert, and
`grouped_experts` runs each active expert on its own int kernel; the reference is `moe_reference`
over the dequantized stacks.
"""

import torch
import torch.nn.functional as F
from torch import nn

from edgelm import kernels
from edgelm.layers.mlp import get_activation


class SharedMLP(nn.Module):
    """output_linear(act(gate) * up) with gate | up = input_linear(x) (the gate is the first half)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.input_linear = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.output_linear = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = kernels.linear(self.input_linear, x).chunk(2, dim=-1)
        return kernels.linear(self.output_linear, self.act(gate) * up)


class ExpertWeights(nn.Module):
    """One stacked weight (E, out, in), so the checkpoint name is `<name>.weight`."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    # the shape of one expert, as nn.Linear names it (quantize_model's shape checks and predicates)
    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    @property
    def in_features(self) -> int:
        return self.weight.shape[2]


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> weights (T, k) in x's dtype, expert ids (T, k)."""
        logits = self.layer(x).float()  # (T, E)
        top, idx = logits.topk(self.top_k, dim=-1)
        return top.softmax(dim=-1).to(x.dtype), idx


class MoE(nn.Module):
    """router.layer (E, hidden), input_linear (E, 2I, hidden), output_linear (E, hidden, I)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, act: str = "silu"
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok {top_k} must be between 1 and num_local_experts {num_experts}"
            )
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.input_linear = ExpertWeights(num_experts, 2 * intermediate_size, hidden_size)
        self.output_linear = ExpertWeights(num_experts, hidden_size, intermediate_size)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (T, hidden)
        weights, idx = self.router(flat)
        out = grouped_experts(flat, weights, idx, self.input_linear, self.output_linear, self.act)
        return out.view_as(x)


def expert_linear(w, e: int, x: torch.Tensor) -> torch.Tensor:
    """x (n, in) -> (n, out) through expert e of: a stacked (E, out, in) tensor (its slice), an
    ExpertWeights (few fp32 rows on the C++ kernel, else its slice), or a QuantizedExperts (the
    expert's own int kernel for few rows, its dequantized weight for many)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w[e])
    if isinstance(w, ExpertWeights):
        out = kernels.stacked_linear(w, e, x)
        return F.linear(x, w.weight[e]) if out is None else out
    return w.expert_forward(e, x)


def grouped_experts(x, weights, idx, w_in, w_out, act) -> torch.Tensor:
    """x (T, hidden), weights/idx (T, k), w_in (E, 2I, hidden), w_out (E, hidden, I) -> (T, hidden).
    w_in / w_out are stacked tensors, ExpertWeights or QuantizedExperts (`expert_linear`).

    The T·k (token, expert) pairs are sorted by expert, so expert e's tokens are one contiguous
    block: one gather, one matmul pair per active expert, one scatter-add back. One token (decode)
    skips the sort: its k experts run in turn."""
    if x.shape[0] == 1:
        return single_token_experts(x, weights, idx, w_in, w_out, act)
    k = idx.shape[1]
    flat_idx = idx.reshape(-1)  # (T·k,)
    order = flat_idx.argsort(stable=True)
    token_of = order // k  # which token each sorted pair belongs to
    num_experts = w_in.shape[0] if isinstance(w_in, torch.Tensor) else w_in.num_experts
    counts = torch.bincount(flat_idx, minlength=num_experts).tolist()
    xs = x[token_of]  # (T·k, hidden), grouped by expert
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            gate, up = expert_linear(w_in, e, xs[start : start + n]).chunk(2, dim=-1)
            ys[start : start + n] = expert_linear(w_out, e, act(gate) * up)
            start += n
    ys = ys * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def single_token_experts(x, weights, idx, w_in, w_out, act) -> torch.Tensor:
    """`grouped_experts` for T = 1, the decode step: no sort, gather or scatter (their fixed cost
    is most of a small expert's time), the k expert outputs summed in routing order."""
    ys = []
    for e in idx[0].tolist():
        gate, up = expert_linear(w_in, e, x).chunk(2, dim=-1)
        ys.append(expert_linear(w_out, e, act(gate) * up))
    return weights @ torch.cat(ys)  # (1, k) @ (k, hidden)


def moe_reference(x, weights, idx, w_in, w_out, act) -> torch.Tensor:
    """The per-token loop `grouped_experts` must agree with."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], idx[t].tolist()):
            gate, up = (w_in[e] @ x[t]).chunk(2)
            out[t] += w * (w_out[e] @ (act(gate) * up))
    return out
