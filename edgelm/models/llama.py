"""Llama and its close relatives: Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2 (qkv bias),
Qwen3 (per-head q/k RMSNorm). Granite and MiniCPM reuse it with their μP multipliers.

    h = embed(tokens) * embedding_multiplier
    per layer:  h += residual_multiplier * attn(rmsnorm(h));  h += residual_multiplier * mlp(rmsnorm(h))
    logits = lm_head(rmsnorm(h)) / logits_scaling
"""

import dataclasses

import torch
from torch import nn

from edgelm.kernels import llama as fast
from edgelm.layers.attention import Attention, ForwardContext
from edgelm.layers.mlp import GatedMLP
from edgelm.layers.norm import RMSNorm
from edgelm.layers.rope import RoPE, normalize_rope_parameters
from edgelm.models.base import BaseConfig, CausalLM


@dataclasses.dataclass
class ModelArgs(BaseConfig):
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_bias: bool | None = None
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool | None = None
    max_window_layers: int | None = None
    layer_types: list | None = None  # "full_attention" / "sliding_attention" per layer
    qk_norm: bool = False  # Qwen3
    # μP-style scalars (Granite names); 1.0 / None means plain Llama.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen3":
            self.qk_norm = True
        if self.use_sliding_window is False:  # Qwen2 ships a window it does not use
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = self._default_layer_types()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        self.rope_parameters = normalize_rope_parameters(
            self.rope_parameters,
            self.rope_scaling,
            self.rope_theta,
            self.max_position_embeddings,
            self.original_max_position_embeddings,
        )
        if isinstance(self.rope_parameters.get("partial_rotary_factor"), (int, float)):
            self.partial_rotary_factor = self.rope_parameters["partial_rotary_factor"]

    def _default_layer_types(self) -> list[str]:
        # Qwen2/3 window only the layers from max_window_layers on; Mistral windows all of them.
        first = 0
        if self.model_type in ("qwen2", "qwen3") and self.max_window_layers is not None:
            first = self.max_window_layers
        windowed = self.sliding_window is not None
        return [
            "sliding_attention" if windowed and i >= first else "full_attention"
            for i in range(self.num_hidden_layers)
        ]

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def qkv_bias(self) -> bool:
        # Qwen2 always has q/k/v biases (and no o bias); Llama's attention_bias covers all four.
        return self.model_type == "qwen2" or bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and bool(self.attention_bias)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rope: RoPE, window: int | None):
        super().__init__()
        self.self_attn = Attention(
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
            qkv_bias=args.qkv_bias,
            o_bias=args.o_bias,
            qk_norm_eps=args.rms_norm_eps if args.qk_norm else None,
            scale=args.attention_multiplier,
            rope=rope,
            window=window,
        )
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.hidden_act, args.mlp_bias)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.residual_multiplier = args.residual_multiplier

    def forward(self, x: torch.Tensor, cache, ctx: ForwardContext) -> torch.Tensor:
        r = self.residual_multiplier
        a = self.self_attn(self.input_layernorm(x), cache, ctx)
        h = x + (a * r if r != 1.0 else a)
        m = self.mlp(self.post_attention_layernorm(h))
        return h + (m * r if r != 1.0 else m)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        rope_dim = int(args.head_dim * args.partial_rotary_factor)
        self.rotary_emb = RoPE(rope_dim, args.rope_parameters, args.max_position_embeddings)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, self.rotary_emb, args.window_of(i)) for i in range(args.num_hidden_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.init_head(args, LlamaModel(args))

    def hidden_states(self, tokens: torch.Tensor, cache, ctx: ForwardContext) -> torch.Tensor:
        h = fast.hidden_states(self, tokens, cache, ctx)  # decode: every layer in one C++ call
        if h is not None:
            return h
        h = self.model.embed_tokens(tokens)  # (B, L, hidden)
        if self.config.embedding_multiplier != 1.0:
            h = h * self.config.embedding_multiplier
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache else None, ctx)
        return self.model.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.head(h)
        s = self.config.logits_scaling
        return out / s if s != 1.0 else out
