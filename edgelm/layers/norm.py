"""Normalisation layers. RMSNorm computes in fp32 whatever the weight dtype, as the references do."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * (offset + w). Gemma stores w - 1 and uses offset = 1."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.offset and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # decode hot path: one op
        w = self.weight.float() + self.offset if self.offset else self.weight.float()
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        # Normalise in fp32 for accuracy, as Llama/Gemma reference code does.
        return F.rms_norm(x.float(), (x.shape[-1],), w, self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm (with bias), computed in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)
