"""`load(path)`: a Hugging Face folder, a GGUF file or a llama2.c checkpoint -> a ready model.

Every format is reduced to (config dict with HF field names, {HF tensor name: tensor}, tokenizer);
the model is built on the meta device and the tensors are assigned in place, so loading never
holds two copies of the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgelm.config import configure_runtime, default_dtype, release_free_memory
from edgelm.formats import gguf as gguf_format
from edgelm.formats import hf as hf_format
from edgelm.formats import llama2c as llama2c_format
from edgelm.models import build_model, get_model_module
from edgelm.quant.gguf import repack_gguf_model
from edgelm.quant.quantize import (
    quantize_decoder,
    quantized_modules,
    record_quantization,
    restore_quantized_layout,
)
from edgelm.tokenizer import Tokenizer


def resolve_path(path: str | Path) -> Path:
    """A local path, or a Hugging Face hub id downloaded (once) into the HF cache."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise ValueError(f"{path}: not a local path, and huggingface_hub is not installed") from e
        try:
            return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
        except Exception as e:
            raise ValueError(f"{path}: not a local path and the hub download failed ({e})") from e
    raise ValueError(f"{path}: no such file or folder")


def read_checkpoint(path: Path) -> tuple[dict, dict, Tokenizer | None]:
    """-> (config, {HF name: tensor or GGUFTensor}, tokenizer)."""
    if path.is_dir():
        config = hf_format.read_config(path)
        get_model_module(config.get("model_type", ""))  # fail on unknown archs before reading weights
        weights = dict(hf_format.iter_safetensors(hf_format.safetensors_files(path)))
        return config, weights, Tokenizer.from_hf_folder(path)
    if path.suffix == ".gguf" or _magic(path) == gguf_format.GGUF_MAGIC:
        g = gguf_format.read_gguf(path)
        config = gguf_format.gguf_config(g)
        return config, gguf_format.gguf_tensors(g, config), Tokenizer.from_gguf_metadata(g.metadata)
    config, weights = llama2c_format.read_llama2c(path)
    return config, weights, _llama2c_tokenizer(path)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _llama2c_tokenizer(path: Path) -> Tokenizer | None:
    for name in ("tokenizer.bin", f"tok{path.stem.split('stories')[-1]}.bin"):
        if (path.parent / name).exists():
            return Tokenizer.from_llama2c(path.parent / name)
    found = sorted(path.parent.glob("tok*.bin"))
    return Tokenizer.from_llama2c(found[0]) if found else None


def tensor_type(t) -> str:
    """'Q4_1', 'F32', ... for GGUF tensors; 'float32', 'bfloat16', ... for torch tensors."""
    if isinstance(t, gguf_format.GGUFTensor):
        return t.type_name
    return str(t.dtype).replace("torch.", "")


def materialize(t, dtype: torch.dtype) -> torch.Tensor:
    """A dense tensor of `dtype` from a torch tensor or a (possibly quantized) GGUF tensor."""
    if isinstance(t, gguf_format.GGUFTensor):
        return t.to_torch(torch.float32).to(dtype)
    return t.to(dtype)


def retie_embeddings(model: torch.nn.Module) -> None:
    """Share the dense embedding with a dense LM head again when the config ties them:
    `load_state_dict(assign=True)` replaced the shared meta parameter. (Quantized heads are tied
    through QuantizedEmbedding instead.)"""
    lm_head, embed = getattr(model, "lm_head", None), model.get_input_embeddings()
    if model.config.tie_word_embeddings and type(lm_head) is torch.nn.Linear and type(embed) is torch.nn.Embedding:
        lm_head.weight = embed.weight


def assign_weights(model: torch.nn.Module, weights: dict, dtype: torch.dtype) -> None:
    """Assign tensors to the parameters still on the meta device, by name; fail naming missing or
    unexpected ones. (Quantized modules swapped in before this already hold their tensors.)"""
    expected = {n: p for n, p in model.named_parameters(remove_duplicate=True) if p.is_meta}
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        weights.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the {model.config.model_type} architecture: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    state = {}
    for name, p in expected.items():
        t = materialize(weights[name], dtype)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"tensor {name}: checkpoint shape {tuple(t.shape)}, config expects {tuple(p.shape)}")
        state[name] = t
    model.load_state_dict(state, strict=False, assign=True)
    retie_embeddings(model)


def assign_quantized_state(model: torch.nn.Module, weights: dict, dtype: torch.dtype) -> None:
    """Load a saved quantized folder's tensors into the layout `restore_quantized_layout` rebuilt:
    quantized modules take their tensors as stored, dense parameters are cast to `dtype`."""
    quantized = set(model.config.quantization["modules"])

    def in_quantized(name: str) -> bool:  # a quantized module's tensor, or one of its experts'
        parts = name.split(".")
        return any(".".join(parts[:i]) in quantized for i in range(len(parts) - 1, 0, -1))

    state = {
        name: t if in_quantized(name) or not t.is_floating_point() else t.to(dtype)
        for name, t in weights.items()
    }
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in quantized:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    retie_embeddings(model)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta or result.unexpected_keys:
        raise ValueError(
            f"quantized checkpoint does not match its recorded layout: missing {still_meta[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )


def load(
    path: str | Path,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | Path | None = None,
    fuse: bool = True,
    dequantize: bool = False,
    quantize: str | None = None,
    group_size: int = 32,
):
    """Load a model ready to run. `dtype=torch.float32` is the exact reference path for dense
    weights; the default picks the fastest dense dtype this machine supports (bf16 with
    AMX/AVX512-BF16, else fp32). `fuse` merges q/k/v and gate/up projections (fewer, larger
    matmuls; same maths).

    Quantized checkpoints stay quantized: GGUF Q4_0/Q4_1/Q4_K blocks are repacked into Int4Linear
    and the other GGUF types into Int8Linear (`quant/gguf.py`), and a folder saved by
    `edgelm quantize` is rebuilt from its `config.json` "quantization" record. `dequantize=True`
    expands GGUF weights to dense `dtype` instead (the reference for parity tests).
    `quantize="int8"|"int4"` quantizes the dense weights at load (weight-only; `group_size` for
    int4), from the dequantized GGUF weights if the file is quantized.
    """
    configure_runtime()
    path = resolve_path(path)
    config, weights, tokenizer = read_checkpoint(path)
    module = get_model_module(config.get("model_type", ""))
    if hasattr(module, "sanitize"):
        weights = module.sanitize(weights, config)
    weight_types = {k: tensor_type(v) for k, v in weights.items()}
    dtype = dtype or default_dtype()
    with torch.device("meta"):
        model = build_model(config)
    if config.get("quantization"):
        restore_quantized_layout(model, config["quantization"])
        assign_quantized_state(model, weights, dtype)
    else:
        if not (dequantize or quantize):
            repack_gguf_model(model, weights, dtype)  # pops the weights it consumes
        assign_weights(model, weights, dtype)
    model.eval().requires_grad_(False)
    if quantize:
        quantize_decoder(model, quantize, group_size)
    if fuse:
        model.fuse()
    if quantized_modules(model):
        q = getattr(model.config, "quantization", None) or {}
        record_quantization(model, q.get("method", "gguf"), q.get("group_size", 32), q.get("symmetric"))
    if tokenizer_path is not None:
        tokenizer = Tokenizer.from_llama2c(tokenizer_path) if str(tokenizer_path).endswith(".bin") else (
            Tokenizer.from_hf_folder(tokenizer_path)
        )
    model.tokenizer = tokenizer
    model.source = str(path)
    model.source_config = config
    model.weight_types = weight_types
    del weights
    release_free_memory()
    return model
