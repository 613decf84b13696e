"""Feed-forward blocks: gated (SwiGLU / GeGLU) and plain two-layer MLPs."""

import torch
import torch.nn.functional as F
from torch import nn

from edgelm import kernels


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": F.relu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One linear whose output is the concatenation of the given ones' outputs; None when they
    cannot share one kernel (quantized with mixed types, as in Q4_K_M GGUF files)."""
    if not all(type(m) is nn.Linear for m in linears):
        from edgelm.quant.linear import fuse_quantized

        return fuse_quantized(linears)
    weight = torch.cat([m.weight for m in linears], dim=0)
    has_bias = [m.bias is not None for m in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias), device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if any(has_bias):
        biases = [m.bias if m.bias is not None else weight.new_zeros(m.out_features) for m in linears]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) -- SwiGLU with silu, GeGLU with gelu-tanh."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(act)
        self.gate_up_proj = None  # set by fuse()

    def fuse(self) -> None:
        """One gate_up_proj matmul instead of two (same maths, half the kernel launches)."""
        if self.gate_up_proj is None:
            fused = fuse_linears([self.gate_proj, self.up_proj])
            if fused is not None:
                self.gate_up_proj = fused
                del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = kernels.linear(self.gate_up_proj, x).chunk(2, dim=-1)
            return kernels.linear(self.down_proj, self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """down(act(up(x))): the plain (non-gated) FFN of GPT-2/OPT/Phi-style models."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))
