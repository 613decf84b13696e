"""What every model file shares: the config base class and the causal-LM wrapper.

A model file defines `ModelArgs` (a dataclass with Hugging Face field names) and `Model` (an
`nn.Module` built from it), plus optional `sanitize(weights)` for checkpoint renames.
"""

import dataclasses
import inspect

import torch
from torch import nn

from edgelm import kernels
from edgelm.cache import KVCache, SlidingWindowKVCache
from edgelm.layers.attention import ForwardContext


@dataclasses.dataclass
class BaseConfig:
    model_type: str = ""
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    quantization: dict | None = None  # quantized-module layout (edgelm/quant/quantize.py)
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a config.json dict; unknown keys are ignored, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_left_pad(left_pad, batch_size: int) -> torch.Tensor | None:
    if left_pad is None:
        return None
    lp = torch.as_tensor(left_pad, dtype=torch.long).reshape(-1)
    if lp.numel() != batch_size:
        raise ValueError(f"left_pad has {lp.numel()} entries for a batch of {batch_size}")
    return lp


class CausalLM(nn.Module):
    """Base for decoder models: `model(tokens, cache) -> logits`.

    Subclasses set `self.config`, `self.layers` (each with `.self_attn.window` when attention) and
    implement `hidden_states(tokens, cache, ctx)` and `logits(h)`.
    """

    tokenizer = None  # attached by the loader

    def init_head(self, args, backbone: nn.Module) -> None:
        """Set `config`, the backbone `model` (with `embed_tokens` and `layers`) and the LM head,
        tied to the input embedding when `args.tie_word_embeddings`."""
        self.config = args
        self.model = backbone
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(h): few rows of a dense fp32 head (decode, verify, batched steps) by edgelm's
        kernel, everything else (and everything while `fast_decode` is False: the profiler's
        module hooks) by the module."""
        fast = self.__dict__.get("fast_decode", True) is not False
        out = kernels.dense_linear(self.lm_head, h) if fast else None
        return self.lm_head(h) if out is None else out

    def fuse(self) -> "CausalLM":
        """Fuse q/k/v and gate/up projections in every layer (same maths, fewer matmuls)."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse"):
                module.fuse()
        return self

    def set_sparse_attention(self, config) -> "CausalLM":
        """Use InfLLM v2 block-sparse attention (a `SparseConfig`; None = dense again) in every
        full-attention layer. Training-free on any dense model; sliding-window layers stay as they are.
        Make caches after calling this (sparse layers keep compressed keys in their cache)."""
        from edgelm.layers.sparse_attention import SparseAttention

        executor = None if config is None else SparseAttention(config)
        for layer in self.layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or getattr(attn, "window", None) is not None:
                continue
            if executor is not None and attn.softcap is not None:
                raise ValueError("sparse attention does not support attention logit soft-capping")
            attn.sparse = executor
        return self

    def supports_tree(self, cache: list | None) -> bool:
        """Whether a tree verify is exact: every layer is full attention (no window, no block-sparse
        selection) that reads positions and masks from the forward context, over a plain KV cache
        whose slots can be compacted after the accepted path is known."""
        from edgelm.layers.attention import Attention

        for layer in self.layers:
            attn = getattr(layer, "self_attn", None)
            if type(attn) is not Attention or attn.sparse is not None or attn.window is not None:
                return False
        return bool(cache) and all(type(c) is KVCache for c in cache)

    def make_cache(self, left_pad=None, max_size: int | None = None) -> list:
        """One cache per layer. `left_pad` (B,) gives each row's left padding for batched prompts."""
        lp = None if left_pad is None else torch.as_tensor(left_pad, dtype=torch.long).reshape(-1)
        caches = []
        for layer in self.layers:
            window = getattr(getattr(layer, "self_attn", None), "window", None)
            sparse = getattr(getattr(layer, "self_attn", None), "sparse", None)
            if window is not None:
                caches.append(SlidingWindowKVCache(window, lp))
            elif sparse is not None:
                caches.append(sparse.make_cache(lp, max_size))  # KV + compressed keys
            else:
                caches.append(KVCache(lp, max_size))
        return caches

    def forward(
        self,
        tokens: torch.Tensor,
        cache: list | None = None,
        left_pad=None,
        num_logits: int | None = None,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, L) LongTensor -> logits (B, L, vocab) float32.

        `num_logits` keeps only the last N positions' logits: prefill needs one, and the LM head is
        ~20% of prefill compute for a 49K vocabulary. `tree` (L,) parent ids make the L tokens a
        speculative draft tree (see `ForwardContext.tree`; only `supports_tree` models).
        """
        if tokens.dim() == 1:
            tokens = tokens[None]
        if cache is None and left_pad is not None:
            cache = self.make_cache(make_left_pad(left_pad, tokens.shape[0]))
        offset = cache[0].offset if cache else 0
        lp = cache[0].left_pad if cache else None
        row_offsets = getattr(cache[0], "row_offsets", None) if cache else None  # batched engine
        if tree is not None and not self.supports_tree(cache):
            raise ValueError(f"{type(self).__name__} with these caches cannot verify a draft tree")
        ctx = ForwardContext.make(tokens, offset, lp, row_offsets, tree)
        h = self.hidden_states(tokens, cache, ctx)
        if num_logits is not None:
            h = h[:, -num_logits:]
        return self.logits(h).float()


def filter_kwargs(fn, kwargs: dict) -> dict:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}
