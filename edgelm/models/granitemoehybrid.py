"""Granite 4.0-H: Mamba-2 and attention layers (`layer_types`), each followed by a fine-grained
MoE plus an always-on shared expert (or the shared MLP alone in the dense H models), no positional
encoding in attention (NoPE), and Granite's μP multipliers.

    h = embed(tokens) * embedding_multiplier
    per layer:  h += residual_multiplier * mixer(rmsnorm(h))       mixer: Mamba-2 or attention
                h += residual_multiplier * (moe(x) + shared_mlp(x)),  x = rmsnorm(h)
    logits = lm_head(rmsnorm(h)) / logits_scaling

Attention layers keep a KV cache; Mamba layers a fixed-size MambaCache (no trim: snapshot/restore).
`models/granitemoe.py` reuses this file with every layer attention and RoPE.
"""

import dataclasses

import torch
from torch import nn

from edgelm.cache import KVCache, MambaCache
from edgelm.layers import mamba2 as mamba2_layers
from edgelm.layers.attention import Attention, ForwardContext
from edgelm.layers.mamba2 import Mamba2Mixer
from edgelm.layers.moe import MoE, SharedMLP
from edgelm.layers.norm import RMSNorm
from edgelm.layers.rope import RoPE, normalize_rope_parameters
from edgelm.models.base import BaseConfig, CausalLM

# checkpoint spelling -> kind; transformers 5 renamed "mamba"/"attention" to these long forms.
LAYER_KINDS = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
}
POSITION_EMBEDDING_TYPES = (None, "nope", "rope")


@dataclasses.dataclass
class ModelArgs(BaseConfig):
    hidden_size: int = 4096
    intermediate_size: int = 11008  # per expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    position_embedding_type: str | None = None  # "rope" rotates q/k; None / "nope": no positions
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    num_local_experts: int = 8  # 0: dense, shared MLP only
    num_experts_per_tok: int = 2
    shared_intermediate_size: int = 1024  # 0: no shared expert (Granite 3 MoE)
    layer_types: list | None = None
    layers_block_type: list | None = None  # older spelling of layer_types
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: int | str = "auto"
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple | list | None = (0.0, float("inf"))

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.layer_types = list(
            self.layer_types or self.layers_block_type or ["mamba"] * self.num_hidden_layers
        )
        self.layers_block_type = None
        self._check_layer_types()
        self._check_mamba()
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"position_embedding_type {self.position_embedding_type!r}: expected one of {POSITION_EMBEDDING_TYPES}"
            )
        self.rope_parameters = normalize_rope_parameters(
            self.rope_parameters, self.rope_scaling, self.rope_theta, self.max_position_embeddings
        )

    def _check_layer_types(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_KINDS))
        if unknown:
            raise ValueError(f"unknown layer types {unknown}; expected one of {sorted(LAYER_KINDS)}")

    def _check_mamba(self) -> None:
        if "mamba" not in self.kinds:
            return
        d_inner = self.mamba_expand * self.hidden_size
        if self.mamba_d_head == "auto":
            if d_inner % self.mamba_n_heads:
                raise ValueError(f"mamba_n_heads {self.mamba_n_heads} does not divide d_inner {d_inner}")
            self.mamba_d_head = d_inner // self.mamba_n_heads
        if self.mamba_n_heads * self.mamba_d_head != d_inner:
            raise ValueError(
                f"mamba_n_heads × mamba_d_head = {self.mamba_n_heads} × {self.mamba_d_head} must equal "
                f"d_inner = mamba_expand × hidden_size = {self.mamba_expand} × {self.hidden_size} = {d_inner}"
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError(
                f"mamba_n_groups {self.mamba_n_groups} does not divide mamba_n_heads {self.mamba_n_heads}"
            )

    @property
    def kinds(self) -> list[str]:
        """'mamba' or 'attention' per layer."""
        return [LAYER_KINDS[t] for t in self.layer_types]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def make_mixer(args: ModelArgs, kind: str, rope: RoPE | None) -> nn.Module:
    if kind == "mamba":
        return Mamba2Mixer(
            args.hidden_size,
            args.mamba_n_heads,
            args.mamba_d_head,
            args.mamba_d_state,
            num_groups=args.mamba_n_groups,
            conv_kernel=args.mamba_d_conv,
            chunk_size=args.mamba_chunk_size,
            eps=args.rms_norm_eps,
            time_step_limit=args.time_step_limit,
            act=args.hidden_act,
            bias=args.mamba_proj_bias,
            conv_bias=args.mamba_conv_bias,
        )
    return Attention(
        args.hidden_size,
        args.num_attention_heads,
        args.num_key_value_heads,
        args.head_dim,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        scale=args.attention_multiplier,
        rope=rope,
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, rope: RoPE | None):
        super().__init__()
        self.kind = kind
        # The checkpoint names the mixer `mamba` or `self_attn`; a layer has one of them.
        self.mamba = make_mixer(args, kind, rope) if kind == "mamba" else None
        self.self_attn = make_mixer(args, kind, rope) if kind == "attention" else None
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.block_sparse_moe = None
        if args.num_local_experts > 0:
            self.block_sparse_moe = MoE(
                args.hidden_size,
                args.intermediate_size,
                args.num_local_experts,
                args.num_experts_per_tok,
                args.hidden_act,
            )
        self.shared_mlp = None
        if args.shared_intermediate_size > 0:
            self.shared_mlp = SharedMLP(args.hidden_size, args.shared_intermediate_size, args.hidden_act)
        self.residual_multiplier = args.residual_multiplier

    @property
    def mixer(self) -> nn.Module:
        return self.mamba if self.kind == "mamba" else self.self_attn

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_sparse_moe is None:
            return self.shared_mlp(x)
        y = self.block_sparse_moe(x)
        return y + self.shared_mlp(x) if self.shared_mlp is not None else y

    def forward(self, x: torch.Tensor, cache, ctx: ForwardContext) -> torch.Tensor:
        r = self.residual_multiplier
        h = x + self.mixer(self.input_layernorm(x), cache, ctx) * r
        return h + self.ffn(self.post_attention_layernorm(h)) * r


class HybridModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.rotary_emb = None
        if args.position_embedding_type == "rope":
            self.rotary_emb = RoPE(args.head_dim, args.rope_parameters, args.max_position_embeddings)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, kind, self.rotary_emb) for kind in args.kinds)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.init_head(args, HybridModel(args))

    def make_cache(self, left_pad=None, max_size: int | None = None) -> list:
        """A MambaCache per Mamba layer, a KVCache per attention layer."""
        lp = None if left_pad is None else torch.as_tensor(left_pad, dtype=torch.long).reshape(-1)
        return [MambaCache(lp) if layer.kind == "mamba" else KVCache(lp, max_size) for layer in self.layers]

    def hidden_states(self, tokens: torch.Tensor, cache, ctx: ForwardContext) -> torch.Tensor:
        h = self.model.embed_tokens(tokens) * self.config.embedding_multiplier  # (B, L, hidden)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache else None, ctx)
        return self.model.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h) / self.config.logits_scaling

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """KV bytes one token adds (attention layers only)."""
        return mamba2_layers.kv_bytes_per_token(self, dtype or self.dtype)

    def state_bytes_per_sequence(self, dtype: torch.dtype | None = None) -> int:
        """Fixed Mamba-state bytes per sequence, whatever its length."""
        return mamba2_layers.state_bytes_per_sequence(self, dtype or self.dtype)


def sanitize(weights: dict, config: dict) -> dict:
    """transformers 5 renames the MoE tensors when it saves; map them back to the checkpoint names."""
    renames = {
        ".block_sparse_moe.experts.gate_up_proj": ".block_sparse_moe.input_linear.weight",
        ".block_sparse_moe.experts.down_proj": ".block_sparse_moe.output_linear.weight",
        ".block_sparse_moe.router.weight": ".block_sparse_moe.router.layer.weight",
    }
    out = {}
    for name, t in weights.items():
        for old, new in renames.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        out[name] = t
    return out
