"""llama2.c checkpoints (`model.bin`): a small header, then fp32 weights in a fixed order.

Legacy v0 header: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len);
a negative vocab_size means the classifier is stored separately (not shared with the embedding).
Version 1 files start with magic 0x616b3432 ("ak42"), version int32 1, the same 7 int32 and a
shared-classifier byte, padded to 256 bytes. llama2.c lays Q/K rows out for interleaved-pair RoPE;
we permute them to the rotate-half layout that edgelm (and Hugging Face) use.
"""

from pathlib import Path

import numpy as np
import torch

from edgelm.layers.rope import interleaved_to_half

MAGIC = 0x616B3432


def _read_header(raw: bytes, path: Path) -> tuple[dict, int, bool]:
    if len(raw) < 28:
        raise ValueError(f"{path}: too short for a llama2.c checkpoint ({len(raw)} bytes)")
    head = np.frombuffer(raw[:8], dtype=np.int32)
    if int(head[0]) == MAGIC:
        if int(head[1]) != 1:
            raise ValueError(f"{path}: llama2.c version {int(head[1])} is not supported (only v0 and v1 fp32)")
        dims = np.frombuffer(raw[8:36], dtype=np.int32)
        shared, start = bool(raw[36]), 256
    else:
        dims = np.frombuffer(raw[:28], dtype=np.int32)
        shared, start = int(dims[5]) > 0, 28
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(x) for x in dims)
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or dim % n_heads:
        raise ValueError(f"{path}: implausible llama2.c header {dims.tolist()}")
    config = {
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "vocab_size": abs(vocab),
        "max_position_embeddings": seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": shared,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return config, start, shared


def read_llama2c(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (config dict with HF field names, {HF tensor name: fp32 tensor})."""
    path = Path(path)
    raw = path.read_bytes()
    config, start, shared = _read_header(raw, path)
    dim, hidden, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H, Hkv, V = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    hd, seq = dim // H, config["max_position_embeddings"]
    layout = [  # (name, shape) in file order
        ("embed", (V, dim)),
        ("attn_norm", (L, dim)),
        ("wq", (L, H * hd, dim)),
        ("wk", (L, Hkv * hd, dim)),
        ("wv", (L, Hkv * hd, dim)),
        ("wo", (L, dim, H * hd)),
        ("ffn_norm", (L, dim)),
        ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)),
        ("final_norm", (dim,)),
        ("freq_cis", (seq, hd)),  # real and imaginary halves; unused (we compute RoPE)
    ]
    if not shared:
        layout.append(("wcls", (V, dim)))
    need = start + 4 * sum(int(np.prod(s)) for _, s in layout)
    if len(raw) < need:
        raise ValueError(f"{path}: truncated llama2.c checkpoint ({len(raw)} bytes, header implies {need})")
    data = np.frombuffer(raw, dtype=np.float32, offset=start)
    t, pos = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        t[name] = torch.from_numpy(data[pos : pos + n].copy()).view(shape)
        pos += n
    return config, _to_hf_names(t, config, shared)


def _to_hf_names(t: dict, config: dict, shared: bool) -> dict[str, torch.Tensor]:
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    w = {"model.embed_tokens.weight": t["embed"], "model.norm.weight": t["final_norm"]}
    if not shared:
        w["lm_head.weight"] = t["wcls"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = t["attn_norm"][i]
        w[p + "self_attn.q_proj.weight"] = interleaved_to_half(t["wq"][i], H)
        w[p + "self_attn.k_proj.weight"] = interleaved_to_half(t["wk"][i], Hkv)
        w[p + "self_attn.v_proj.weight"] = t["wv"][i]
        w[p + "self_attn.o_proj.weight"] = t["wo"][i]
        w[p + "post_attention_layernorm.weight"] = t["ffn_norm"][i]
        w[p + "mlp.gate_proj.weight"] = t["w1"][i]
        w[p + "mlp.down_proj.weight"] = t["w2"][i]
        w[p + "mlp.up_proj.weight"] = t["w3"][i]
    return w
