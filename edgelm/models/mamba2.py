"""Mamba-2 (attention-free): every layer is h += mixer(rmsnorm(h)), no MLP.

    h = embed(tokens)
    per layer:  h += mamba2_mixer(rmsnorm(h))      (residual kept in fp32: residual_in_fp32)
    logits = lm_head(rmsnorm(h))

The checkpoint's `backbone.{embeddings,layers,norm_f}` are renamed by `sanitize` to the
`model.{embed_tokens,layers,norm}` every other edgelm model uses.
"""

import dataclasses

import torch
from torch import nn

from edgelm.cache import MambaCache
from edgelm.layers import mamba2 as mamba2_layers
from edgelm.layers.attention import ForwardContext
from edgelm.layers.mamba2 import Mamba2Mixer
from edgelm.layers.norm import RMSNorm
from edgelm.models.base import BaseConfig, CausalLM


@dataclasses.dataclass
class ModelArgs(BaseConfig):
    vocab_size: int = 32768
    hidden_size: int = 4096
    num_hidden_layers: int = 64
    num_heads: int = 128
    head_dim: int = 64
    state_size: int = 128
    n_groups: int = 8
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int = 256
    layer_norm_epsilon: float = 1e-5
    hidden_act: str = "silu"
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    time_step_limit: tuple | list | None = (0.0, float("inf"))
    max_position_embeddings: int = 1 << 20  # a recurrence has no positional limit

    def __post_init__(self):
        d_inner = self.expand * self.hidden_size
        if self.num_heads * self.head_dim != d_inner:
            raise ValueError(
                f"num_heads × head_dim = {self.num_heads} × {self.head_dim} must equal "
                f"expand × hidden_size = {self.expand} × {self.hidden_size} = {d_inner}"
            )
        if self.num_heads % self.n_groups:
            raise ValueError(f"n_groups {self.n_groups} does not divide num_heads {self.num_heads}")


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(
            args.hidden_size,
            args.num_heads,
            args.head_dim,
            args.state_size,
            num_groups=args.n_groups,
            conv_kernel=args.conv_kernel,
            chunk_size=args.chunk_size,
            eps=args.layer_norm_epsilon,
            time_step_limit=args.time_step_limit,
            act=args.hidden_act,
            bias=args.use_bias,
            conv_bias=args.use_conv_bias,
        )
        self.residual_in_fp32 = args.residual_in_fp32
        self.kind = "mamba"

    def forward(self, h: torch.Tensor, cache, ctx: ForwardContext) -> torch.Tensor:
        y = self.mixer(self.norm(h.to(self.norm.weight.dtype)), cache, ctx)
        return (h.float() if self.residual_in_fp32 else h) + y


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.layer_norm_epsilon)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.init_head(args, Backbone(args))

    def make_cache(self, left_pad=None, max_size: int | None = None) -> list:
        """One MambaCache per layer (`max_size` is irrelevant: the state has a fixed size)."""
        lp = None if left_pad is None else torch.as_tensor(left_pad, dtype=torch.long).reshape(-1)
        return [MambaCache(lp) for _ in self.layers]

    def hidden_states(self, tokens: torch.Tensor, cache, ctx: ForwardContext) -> torch.Tensor:
        h = self.model.embed_tokens(tokens)  # (B, L, hidden)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache else None, ctx)
        return self.model.norm(h.to(self.model.norm.weight.dtype))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h.to(self.lm_head.weight.dtype))

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        return 0

    def state_bytes_per_sequence(self, dtype: torch.dtype | None = None) -> int:
        """Fixed Mamba-state bytes per sequence, whatever its length."""
        return mamba2_layers.state_bytes_per_sequence(self, dtype or self.dtype)


RENAMES = (
    ("backbone.embeddings.", "model.embed_tokens."),
    ("backbone.embedding.", "model.embed_tokens."),  # older Mamba checkpoints
    ("backbone.norm_f.", "model.norm."),
    ("backbone.layers.", "model.layers."),
)


def sanitize(weights: dict, config: dict) -> dict:
    """Hugging Face `backbone.*` names -> edgelm's `model.*` (GGUF names arrive already mapped)."""
    out = {}
    for name, t in weights.items():
        for old, new in RENAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = t
    return out
