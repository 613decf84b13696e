"""The architecture analyzer: numbers equal hand-computed values, from a config alone."""

import json

import torch

from edgelm.cli import main
from edgelm.inspect import analyze_config

SMOLLM2_135M = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
    "max_position_embeddings": 8192, "rope_theta": 100000.0,
}
LLAMA32_1B = {
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "tie_word_embeddings": True, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
GEMMA3_1B = {
    "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
    "sliding_window": 512, "sliding_window_pattern": 6, "max_position_embeddings": 32768,
}


def test_smollm2_by_hand():
    info = analyze_config(SMOLLM2_135M)
    d, i, L, V = 576, 1536, 30, 49152
    per_layer = d * 576 + 2 * d * 192 + 576 * d + 3 * d * i + 2 * d  # q, k+v, o, gate/up/down, 2 norms
    assert info["parameters"] == V * d + L * per_layer + d == 134_515_008
    assert info["embedding_parameters"] == V * d
    assert info["kv_bytes_per_token"] == 2 * L * 3 * 64 * 4  # K+V, fp32
    assert info["attention"].startswith("GQA (3") and info["ffn"] == "gated (silu)" and info["norm"] == "RMSNorm"
    assert info["ffn_ratio"] == round(1536 / 576, 2)


def test_llama32_1b_by_hand():
    info = analyze_config(LLAMA32_1B, dtype=torch.bfloat16, context=4096, batch=2)
    d, i, L, V = 2048, 8192, 16, 128256
    per_layer = 2 * d * 2048 + 2 * d * 512 + 3 * d * i + 2 * d
    assert info["parameters"] == V * d + L * per_layer + d == 1_235_814_400
    assert info["kv_bytes_per_token"] == 2 * L * 8 * 64 * 2
    assert info["kv_cache_bytes"] == 2 * L * 8 * 64 * 2 * 4096 * 2
    assert info["weight_bytes"] == info["parameters"] * 2
    assert info["predicted_total_bytes"] == info["weight_bytes"] + info["kv_cache_bytes"]


def test_gemma3_1b_by_hand_with_sliding_windows():
    info = analyze_config(GEMMA3_1B, dtype=torch.bfloat16, context=32768)
    d, i, L, V = 1152, 6912, 26, 262144
    per_layer = d * 1024 + 2 * d * 256 + 1024 * d + 3 * d * i + 4 * d + 2 * 256  # 4 norms + q/k norms
    assert info["parameters"] == V * d + L * per_layer + d == 999_885_952
    assert info["attention"] == "MQA" and info["norm"] == "RMSNorm (1 + w)"
    assert info["ffn"] == "gated (gelu_tanh)"
    assert info["sliding_window_layers"] == 22  # every 6th layer is global
    per_token_layer = 2 * 1 * 256 * 2
    assert info["kv_cache_bytes"] == 4 * per_token_layer * 32768 + 22 * per_token_layer * 512


def test_cli_inspect_config_only(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMOLLM2_135M))
    assert main(["inspect", "--model", str(path), "--json", "--context", "2048"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 134_515_008 and info["kv_cache_bytes"] == 46_080 * 2048
