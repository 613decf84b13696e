"""Gemma 3 (text): GeGLU, (1 + w) RMSNorm, q/k norm, norms before *and* after each block, local
sliding-window layers and global layers with their own RoPE bases, embeddings scaled by √hidden,
optional final logit soft-capping.

    h = embed(tokens) * √hidden
    per layer:  h += post_attn_norm(attn(input_norm(h)));  h += post_ffw_norm(mlp(pre_ffw_norm(h)))
    logits = softcap(lm_head(norm(h)))
"""

import dataclasses

import torch
from torch import nn

from edgelm.layers.attention import Attention, ForwardContext
from edgelm.layers.mlp import GatedMLP
from edgelm.layers.norm import RMSNorm
from edgelm.layers.rope import RoPE, normalize_rope_parameters
from edgelm.models.base import BaseConfig, CausalLM

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass
class ModelArgs(BaseConfig):
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    layer_types: list | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.layer_types is None:
            p = self.sliding_window_pattern
            self.layer_types = [
                "sliding_attention" if (i + 1) % p else "full_attention" for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"unknown Gemma 3 layer types {sorted(unknown)}; expected {LAYER_TYPES}")
        self.rope_parameters = self._rope_per_layer_type()

    def _rope_per_layer_type(self) -> dict:
        nested = self.rope_parameters or {}
        if nested and not set(nested) <= set(LAYER_TYPES):  # a flat dict: it is the global one
            nested = {"full_attention": nested}
        full = normalize_rope_parameters(
            nested.get("full_attention"), self.rope_scaling, self.rope_theta, self.max_position_embeddings
        )
        local = normalize_rope_parameters(
            nested.get("sliding_attention"), None, self.rope_local_base_freq, self.max_position_embeddings
        )
        return {"full_attention": full, "sliding_attention": local}


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rope: RoPE, sliding: bool):
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(
            d,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            qk_norm_eps=eps,
            norm_offset=1.0,
            scale=args.query_pre_attn_scalar**-0.5,
            rope=rope,
            window=args.sliding_window if sliding else None,
            softcap=args.attn_logit_softcapping,
        )
        self.mlp = GatedMLP(d, args.intermediate_size, args.hidden_activation)
        self.input_layernorm = RMSNorm(d, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(d, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(d, eps, offset=1.0)

    def forward(self, x: torch.Tensor, cache, ctx: ForwardContext) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache, ctx))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        ropes = {t: RoPE(args.head_dim, p, args.max_position_embeddings) for t, p in args.rope_parameters.items()}
        self.rotary_emb_global, self.rotary_emb_local = ropes["full_attention"], ropes["sliding_attention"]
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, ropes[t], t == "sliding_attention") for t in args.layer_types
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, offset=1.0)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.init_head(args, Gemma3Model(args))

    def hidden_states(self, tokens: torch.Tensor, cache, ctx: ForwardContext) -> torch.Tensor:
        h = self.model.embed_tokens(tokens)
        # The scale is rounded to the weight dtype first, as the reference does.
        h = h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache else None, ctx)
        return self.model.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.head(h)
        cap = self.config.final_logit_softcapping
        return out if cap is None else torch.tanh(out.float() / cap) * cap


def sanitize(weights: dict, config: dict) -> dict:
    """Multimodal Gemma 3 checkpoints nest the text model; keep only it, under the text names."""
    out = {}
    for name, t in weights.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal")):
            continue
        name = name.replace("language_model.model.", "model.").replace("model.language_model.", "model.")
        name = name.replace("language_model.lm_head.", "lm_head.")
        out[name] = t
    return out
