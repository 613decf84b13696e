"""`edgelm inspect`: the SLM survey's architecture analyzer, for a loaded model or a config alone.

Everything is derived from the module tree built from the config (on the meta device when there
are no weights), so parameter counts are exact for every architecture edgelm can build.
"""

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from edgelm.layers.attention import Attention
from edgelm.layers.mamba2 import state_bytes_per_sequence
from edgelm.layers.mlp import MLP, GatedMLP
from edgelm.layers.norm import LayerNorm, RMSNorm
from edgelm.models import build_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total unique parameters, of which the input embedding table)."""
    from edgelm.quant.linear import QUANTIZED_LINEARS, QuantizedEmbedding

    total = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QUANTIZED_LINEARS))
    embeds = [m for m in model.modules() if isinstance(m, (nn.Embedding, QuantizedEmbedding))]
    embed = sum(m.num_embeddings * m.embedding_dim for m in embeds)
    return total, embed


def attention_kind(num_heads: int, num_kv_heads: int) -> str:
    if num_kv_heads == num_heads:
        return "MHA"
    return "MQA" if num_kv_heads == 1 else f"GQA ({num_heads // num_kv_heads} query heads per KV head)"


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """K and V bytes one token adds across all attention layers (before any window cap)."""
    elt = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * a.num_kv_heads * a.head_dim * elt for a in attention_layers(model))


def kv_bytes(model: nn.Module, dtype: torch.dtype, context: int, batch: int = 1) -> int:
    """KV cache bytes at `context` tokens: sliding-window layers hold at most their window."""
    elt = torch.tensor([], dtype=dtype).element_size()
    per_seq = sum(2 * a.num_kv_heads * a.head_dim * elt * min(context, a.window or context)
                  for a in attention_layers(model))
    return per_seq * batch


def dense_equivalent_kv_bytes(model: nn.Module, dtype: torch.dtype, context: int, batch: int = 1) -> int:
    """KV bytes at `context` if every layer were attention shaped like the model's attention layers
    (the dense configuration of the same width), for comparing a hybrid against it."""
    attn = attention_layers(model)
    if not attn:
        return 0
    elt = torch.tensor([], dtype=dtype).element_size()
    return len(model.layers) * 2 * attn[0].num_kv_heads * attn[0].head_dim * elt * context * batch


def ffn_kind(model: nn.Module) -> str:
    kinds = Counter(type(m).__name__ for m in model.modules() if isinstance(m, (GatedMLP, MLP)))
    if not kinds:
        return "none"
    mlp = next(m for m in model.modules() if isinstance(m, (GatedMLP, MLP)))
    act = getattr(mlp.act, "__name__", str(mlp.act))
    name = "gated" if isinstance(mlp, GatedMLP) else "plain"
    return f"{name} ({act})"


def norm_kind(model: nn.Module) -> str:
    for m in model.modules():
        if isinstance(m, RMSNorm):
            return "RMSNorm (1 + w)" if m.offset else "RMSNorm"
        if isinstance(m, LayerNorm | nn.LayerNorm):
            return "LayerNorm"
    return "none"


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("inv_freq") or (t.device.type != "meta" and t.data_ptr() in seen):
            continue
        if t.device.type != "meta":
            seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def analyze(model: nn.Module, context: int | None = None, batch: int = 1) -> dict:
    """Architecture facts and memory predictions for a model (meta or loaded)."""
    c = model.config
    total, embed = count_parameters(model)
    dtype = next(model.parameters()).dtype
    context = context or c.max_position_embeddings
    attn = attention_layers(model)
    wbytes = weight_bytes(model)
    kv = kv_bytes(model, dtype, context, batch)
    state = state_bytes_per_sequence(model, dtype)  # Mamba layers: fixed, whatever the context
    info = {
        "model_type": c.model_type,
        "parameters": total,
        "embedding_parameters": embed,
        "non_embedding_parameters": total - embed,
        "layers": c.num_hidden_layers,
        "attention_layers": len(attn),
        "hidden_size": c.hidden_size,
        "attention": attention_kind(attn[0].num_heads, attn[0].num_kv_heads) if attn else "none",
        "heads (q/kv) x head_dim": f"{attn[0].num_heads}/{attn[0].num_kv_heads} x {attn[0].head_dim}" if attn else "-",
        "sliding_window_layers": sum(1 for a in attn if a.window),
        "ffn": ffn_kind(model),
        "ffn_ratio": round(getattr(c, "intermediate_size", 0) / c.hidden_size, 2),
        "norm": norm_kind(model),
        "vocab_size": c.vocab_size,
        "tied_embeddings": bool(c.tie_word_embeddings),
        "context_length": c.max_position_embeddings,
        "dtype": str(dtype).replace("torch.", ""),
        "kv_bytes_per_token": kv_bytes_per_token(model, dtype),
        "state_bytes_per_sequence": state,
        "predicted_at": {"context": context, "batch": batch},
        "weight_bytes": wbytes,
        "kv_cache_bytes": kv,
        "state_cache_bytes": state * batch,
        "predicted_total_bytes": wbytes + kv + state * batch,
    }
    if state:  # a hybrid: what the same width would hold with attention in every layer
        info["layer_kinds"] = dict(Counter(getattr(layer, "kind", "attention") for layer in model.layers))
        info["dense_equivalent_kv_cache_bytes"] = dense_equivalent_kv_bytes(model, dtype, context, batch)
    if hasattr(model, "weight_types"):
        info["checkpoint_tensor_types"] = dict(Counter(model.weight_types.values()))
        info["source"] = getattr(model, "source", "")
    return info


def read_config_only(path: Path) -> dict | None:
    """A config.json (file, or folder without weights) -> dict; None if there are weights to load."""
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    if path.is_dir() and (path / "config.json").exists() and not any(path.glob("*.safetensors")):
        return json.loads((path / "config.json").read_text())
    return None


def analyze_config(config: dict, dtype: torch.dtype = torch.float32, context: int | None = None,
                   batch: int = 1) -> dict:
    """Analyze an architecture before downloading it: the model is built on the meta device."""
    from edgelm.formats.hf import text_config

    with torch.device("meta"):
        model = build_model(text_config(config)).to(dtype)
    return analyze(model, context, batch)
