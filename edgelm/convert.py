"""Write models back to disk as Hugging Face folders (config.json + model.safetensors + tokenizer).

    save_quantized(model, out)  the quantized modules' own tensors (int4 codes in the portable
                                `pack_int4` order, bf16 scales, int8 matrices) and the layout in
                                config.json "quantization"; `load(out)` rebuilds the same modules.
    export_hf(model, out)       dense weights (quantized ones dequantized) under the original HF
                                names, readable by transformers and by ONNX Runtime GenAI's builder.

Both want an unfused model (`load(..., fuse=False)`): the saved names are the checkpoint's own.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from edgelm.layers.moe import ExpertWeights
from edgelm.quant.linear import QUANTIZED_LINEARS, QuantizedEmbedding, QuantizedExperts
from edgelm.quant.quantize import set_module

# model_type -> transformers class, for config.json "architectures"
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "minicpm": "MiniCPMForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "granitemoehybrid": "GraniteMoeHybridForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
    "mamba2": "Mamba2ForCausalLM",
}


def check_unfused(model: nn.Module) -> None:
    fused = [p for p, m in model.named_modules() if p.endswith(("qkv_proj", "gate_up_proj"))]
    if fused:
        raise ValueError(f"{fused[0]} is fused: load the model with fuse=False before saving it")


def model_config(model: nn.Module) -> dict:
    """The checkpoint's config.json dict (as read at load time), refreshed with the live config."""
    config = dict(getattr(model, "source_config", None) or model.config.to_dict())
    config.pop("quantization", None)
    config.setdefault("architectures", [HF_ARCHITECTURES.get(config.get("model_type"), "LlamaForCausalLM")])
    config.setdefault("torch_dtype", "float32")
    return config


def _state_without_ties(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with each shared tensor stored once (safetensors refuses aliases) and contiguous."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            continue  # the tied LM head: the loader re-ties it from tie_word_embeddings
        seen.add(key)
        state[name] = t.detach().contiguous()
    return state


def write_folder(out: str | Path, config: dict, state: dict, tokenizer) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def save_quantized(model: nn.Module, out: str | Path) -> Path:
    """A folder `load(out)` runs directly, quantized modules included."""
    check_unfused(model)
    config = model_config(model)
    if getattr(model.config, "quantization", None):
        config["quantization"] = model.config.quantization
    return write_folder(out, config, _state_without_ties(model), model.tokenizer)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized module by its dense reference (nn.Linear / nn.Embedding /
    ExpertWeights), in place."""
    for path, m in list(model.named_modules()):
        if isinstance(m, QuantizedExperts):
            with torch.device("meta"):
                dense = ExpertWeights(m.num_experts, m.out_features, m.in_features)
            dense.weight = nn.Parameter(m.dequantize(dtype), requires_grad=False)
            set_module(model, path, dense)
    linears = {id(m): nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
               for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)}
    for path, m in list(model.named_modules()):
        if isinstance(m, QUANTIZED_LINEARS):
            dense = linears[id(m)]
            dense.weight = nn.Parameter(m.dequantize(dtype), requires_grad=False)
            if m.bias is not None:
                dense.bias = nn.Parameter(m.bias.to(dtype), requires_grad=False)
            set_module(model, path, dense)
    for path, m in list(model.named_modules()):
        if isinstance(m, QuantizedEmbedding):
            emb = nn.Embedding(m.num_embeddings, m.embedding_dim, device="meta")
            source = linears.get(id(m.source))
            weight = source.weight if m.tied and source is not None else m.source.dequantize(dtype)
            emb.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
            set_module(model, path, emb)
    model.config.quantization = None
    return model


def export_hf(model: nn.Module, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A plain Hugging Face folder (dense `dtype` weights) for transformers / ONNX Runtime GenAI."""
    check_unfused(model)
    dequantize_model(model, dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _state_without_ties(model).items()}
    config = model_config(model)
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    return write_folder(out, config, state, model.tokenizer)
