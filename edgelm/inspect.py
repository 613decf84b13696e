"""`edgelm inspect`: what a loaded model is made of."""

from collections import Counter

import torch


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total unique parameters, of which embedding table)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    embed = model.model.embed_tokens.weight.numel()
    return total, embed


def attention_kind(num_heads: int, num_kv_heads: int) -> str:
    if num_kv_heads == num_heads:
        return "MHA"
    return "MQA" if num_kv_heads == 1 else f"GQA ({num_heads // num_kv_heads} query heads per KV head)"


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V one token adds across all layers (sliding layers counted as full)."""
    elt = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elt


def describe(model) -> dict:
    c = model.config
    total, embed = count_parameters(model)
    types = Counter(getattr(model, "weight_types", {}).values())
    return {
        "model_type": c.model_type,
        "source": getattr(model, "source", ""),
        "parameters": total,
        "embedding_parameters": embed,
        "non_embedding_parameters": total - embed,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention": attention_kind(c.num_attention_heads, c.num_key_value_heads),
        "heads (q/kv) x head_dim": f"{c.num_attention_heads}/{c.num_key_value_heads} x {c.head_dim}",
        "vocab_size": c.vocab_size,
        "tied_embeddings": c.tie_word_embeddings,
        "context_length": model.context_length,
        "compute_dtype": str(model.dtype).replace("torch.", ""),
        "checkpoint_tensor_types": dict(types),
        "kv_bytes_per_token": kv_bytes_per_token(c, model.dtype),
    }
