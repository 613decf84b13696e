"""GGUF files: metadata as plain Python values and tensors as raw (possibly quantized) blocks.

The file is memory-mapped by the `gguf` package; nothing here copies a tensor until asked. Quantized
tensors stay as their raw GGML blocks (`GGUFTensor.data`, uint8 rows) so the quantized linears can
repack them without going through fp32.
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFTensor:
    """One tensor as stored: `shape` in PyTorch order (rows, cols); `data` the raw numpy view."""

    name: str
    type_name: str  # GGML type name: "F32", "Q4_1", ...
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def is_quantized(self) -> bool:
        return self.type_name not in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_torch(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize (if needed) to a dense tensor of `shape`."""
        import gguf

        if self.type_name == "BF16":
            raw = torch.from_numpy(np.ascontiguousarray(self.data).view(np.int16))
            return raw.view(torch.bfloat16).reshape(self.shape).to(dtype)
        if self.is_quantized:
            qtype = gguf.GGMLQuantizationType[self.type_name]
            arr = gguf.quants.dequantize(self.data, qtype)
        else:
            arr = np.array(self.data)  # copy: the memory map is read-only
        return torch.from_numpy(np.ascontiguousarray(arr)).reshape(self.shape).to(dtype)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def check_header(path: Path) -> None:
    """Fail early with a clear message on files that are not GGUF at all."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")


# GGUF metadata value types (gguf spec, GGUFValueType): scalar id -> struct format
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# numpy dtypes of the dense GGML tensor types (others are raw uint8 blocks)
_DENSE_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64,
             "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


class _Cursor:
    """Sequential little-endian reads over the memory-mapped file (struct on the mmap itself:
    slicing a numpy memmap per value costs ~100x more)."""

    def __init__(self, mm):
        self.mm, self.pos, self.size = mm, 0, len(mm)

    def _check(self, n: int) -> None:
        if self.pos + n > self.size:
            raise ValueError(f"needs {self.pos + n} bytes, the file has {self.size}")

    def take(self, n: int) -> bytes:
        self._check(n)
        self.pos += n
        return self.mm[self.pos - n : self.pos]

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self._check(n)
        self.pos += n
        return struct.unpack_from(fmt, self.mm, self.pos - n)[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALARS and itype != 7:  # numeric arrays in one numpy read
                dt = np.dtype(_SCALARS[itype])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            return [self.value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file (v2/v3, little-endian): metadata parsed, tensors left as views into the
    memory map. Raises ValueError naming the problem for truncated or corrupt files.

    Layout (ggml/docs/gguf.md): magic, u32 version, u64 tensor count, u64 metadata count; metadata
    as (string key, u32 type, value); tensor infos as (string name, u32 n_dims, u64 dims fastest
    first, u32 ggml type, u64 offset); tensor data from the next multiple of `general.alignment`.
    A hand-written reader because gguf-py's builds numpy views per array element: it took ~10 s
    (46 s on a busy machine) on SmolLM2's 49K-token vocabulary; this takes well under a second.
    """
    path = Path(path)
    check_header(path)
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return _parse(path, mm)
    except (ValueError, struct.error, KeyError, OverflowError) as e:
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({e})") from e


def _parse(path: Path, mm) -> GGUFFile:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    cur, buf = _Cursor(mm), np.frombuffer(mm, dtype=np.uint8)  # buf: read-only view, keeps mm open
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3; big-endian files are not)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = cur.string(), cur.scalar("<I")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, dims, GGMLQuantizationType(cur.scalar("<I")).name, cur.scalar("<Q")))
    align = int(metadata.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, type_name, offset in infos:
        shape = tuple(int(d) for d in reversed(dims))  # PyTorch order (rows, cols)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
        if dims[0] % block:
            raise ValueError(f"tensor {name}: row of {dims[0]} is not a whole number of {type_name} blocks")
        row_bytes = dims[0] // block * type_size
        nbytes = row_bytes * int(np.prod(dims[1:], dtype=np.int64))
        if start + offset + nbytes > len(buf):
            raise ValueError(f"tensor {name} ends at byte {start + offset + nbytes}, past the end ({len(buf)})")
        raw = buf[start + offset : start + offset + nbytes]
        if type_name in _DENSE_NP:
            data = raw.view(_DENSE_NP[type_name]).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], row_bytes)  # raw blocks, one row of bytes per row
        tensors[name] = GGUFTensor(name, type_name, shape, data)
    return GGUFFile(path, metadata, tensors)


# GGUF architecture -> Hugging Face model_type
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "granite": "granite",
    "minicpm": "minicpm",
    "gemma3": "gemma3_text",
    "granitemoe": "granitemoe",
    "granitehybrid": "granitemoehybrid",
    "mamba2": "mamba2",
}
# llama.cpp permutes Q/K rows to interleaved RoPE pairs for these archs; we undo it.
PERMUTED_QK = {"llama", "granite", "minicpm", "granitemoe", "granitehybrid"}

# "{arch}.<key>" -> config.json field
GGUF_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "embedding_scale": "embedding_multiplier",
    "residual_scale": "residual_multiplier",
    "attention.scale": "attention_multiplier",
    "logit_scale": "logits_scaling",
    "final_logit_softcapping": "final_logit_softcapping",
}

# GGUF tensor name (without "blk.N." and ".weight"/".bias") -> Hugging Face module name
GGUF_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_post_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GGUF_TENSOR_NAMES_BY_ARCH = {"gemma3": {"ffn_norm": "pre_feedforward_layernorm"}}

# --- Granite MoE, Granite 4.0-H (granitehybrid) and Mamba-2 ---------------------------------
# llama.cpp splits the fused expert / shared-expert `input_linear` (gate rows, then up rows) into
# two tensors; "<name>:gate" / "<name>:up" are joined back by `merge_gate_up`.
_GRANITE_MOE_NAMES = {
    "ffn_gate_inp": "block_sparse_moe.router.layer",
    "ffn_gate_exps": "block_sparse_moe.input_linear:gate",
    "ffn_up_exps": "block_sparse_moe.input_linear:up",
    "ffn_down_exps": "block_sparse_moe.output_linear",
    "ffn_gate_shexp": "shared_mlp.input_linear:gate",
    "ffn_up_shexp": "shared_mlp.input_linear:up",
    "ffn_down_shexp": "shared_mlp.output_linear",
}
# Mamba-2 mixer tensors, relative to the mixer module. llama.cpp stores A = -exp(A_log) as (H, 1),
# D as (H, 1), the gated norm as (G, d_inner / G) and the conv weight as (C, K): see `ssm_tensor`.
_SSM_NAMES = {
    "ssm_in.weight": "in_proj.weight",
    "ssm_in.bias": "in_proj.bias",
    "ssm_conv1d.weight": "conv1d.weight",
    "ssm_conv1d.bias": "conv1d.bias",
    "ssm_dt.bias": "dt_bias",
    "ssm_a": "A_log",
    "ssm_d": "D",
    "ssm_norm.weight": "norm.weight",
    "ssm_out.weight": "out_proj.weight",
    "ssm_out.bias": "out_proj.bias",
}
GGUF_TENSOR_NAMES_BY_ARCH["granitemoe"] = _GRANITE_MOE_NAMES
GGUF_TENSOR_NAMES_BY_ARCH["granitehybrid"] = {
    **_GRANITE_MOE_NAMES,
    # dense H models: the shared MLP is written as a plain FFN
    "ffn_gate": "shared_mlp.input_linear:gate",
    "ffn_up": "shared_mlp.input_linear:up",
    "ffn_down": "shared_mlp.output_linear",
}
GGUF_TENSOR_NAMES_BY_ARCH["mamba2"] = {"attn_norm": "norm"}
# "blk.N.<rest>" -> "model.layers.N.<name>" for tensors whose name is not <base>.<weight|bias>
GGUF_LAYER_TENSOR_NAMES_BY_ARCH = {
    "granitehybrid": {k: f"mamba.{v}" for k, v in _SSM_NAMES.items()},
    "mamba2": {k: f"mixer.{v}" for k, v in _SSM_NAMES.items()},
}
_EXPERT_KEYS = {
    "expert_count": "num_local_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_shared_feed_forward_length": "shared_intermediate_size",
}
# "{arch}.<key>" -> config field, on top of (and overriding) GGUF_CONFIG_KEYS
GGUF_CONFIG_KEYS_BY_ARCH = {
    "granitemoe": _EXPERT_KEYS,
    "granitehybrid": {
        **_EXPERT_KEYS,
        "ssm.conv_kernel": "mamba_d_conv",
        "ssm.state_size": "mamba_d_state",
        "ssm.group_count": "mamba_n_groups",
        "ssm.time_step_rank": "mamba_n_heads",  # llama.cpp stores the head count here
    },
    "mamba2": {
        "ssm.conv_kernel": "conv_kernel",
        "ssm.state_size": "state_size",
        "ssm.group_count": "n_groups",
        "ssm.time_step_rank": "num_heads",
        "attention.layer_norm_rms_epsilon": "layer_norm_epsilon",
    },
}


def _granitehybrid_config(g: "GGUFFile", config: dict) -> None:
    """Per-layer head_count_kv (0 marks a Mamba layer) -> layer_types; ssm sizes -> mamba_*."""
    m, arch = g.metadata, g.architecture
    kv = config.get("num_key_value_heads")
    kv = kv if isinstance(kv, list) else [kv or 0] * config["num_hidden_layers"]
    config["layer_types"] = ["attention" if n else "mamba" for n in kv]
    config["num_key_value_heads"] = max(kv) or config["num_attention_heads"]
    inner = m.get(f"{arch}.ssm.inner_size")
    if inner:
        config["mamba_expand"] = inner // config["hidden_size"]
        config["mamba_d_head"] = inner // config["mamba_n_heads"]
    # llama.cpp's Granite graphs apply RoPE only when this flag is set (default on); H models clear it.
    rope = m.get(f"{arch}.rope.scaling.finetuned", True)
    config["position_embedding_type"] = "rope" if rope else "nope"


def _mamba2_config(g: "GGUFFile", config: dict) -> None:
    inner = g.metadata[f"{g.architecture}.ssm.inner_size"]
    config["expand"] = inner // config["hidden_size"]
    config["head_dim"] = inner // config["num_heads"]


GGUF_CONFIG_FIXUPS = {"granitehybrid": _granitehybrid_config, "mamba2": _mamba2_config}


def ssm_tensor(hf_name: str, t: "GGUFTensor"):
    """Undo llama.cpp's Mamba-2 layouts: A_log = log(-A); flat D and norm; conv weight (C, 1, K)."""
    numel = int(np.prod(t.shape))
    if hf_name.endswith(".A_log"):
        return torch.log(-t.to_torch(torch.float32).reshape(-1))
    if hf_name.endswith((".D", ".norm.weight")):
        return GGUFTensor(t.name, t.type_name, (numel,), t.data)
    if hf_name.endswith(".conv1d.weight") and len(t.shape) == 2:
        return GGUFTensor(t.name, t.type_name, (t.shape[0], 1, t.shape[1]), t.data)
    return t


def merge_gate_up(tensors: dict) -> dict:
    """Join "<name>:gate.weight" and "<name>:up.weight" rows into "<name>.weight" (gate first)."""
    out = {}
    for name, t in tensors.items():
        if ":up." in name:
            continue
        if ":gate." not in name:
            out[name] = t
            continue
        up = tensors[name.replace(":gate.", ":up.")]
        out[name.replace(":gate.", ".")] = _concat_rows(t, up)
    return out


def _concat_rows(a, b):
    """Concatenate along the output rows (dim -2); raw blocks when both share one GGML type."""
    if isinstance(a, GGUFTensor) and isinstance(b, GGUFTensor) and a.type_name == b.type_name:
        shape = (*a.shape[:-2], a.shape[-2] + b.shape[-2], a.shape[-1])
        data = np.concatenate([np.asarray(a.data), np.asarray(b.data)], axis=-2)
        return GGUFTensor(a.name, a.type_name, shape, data)
    as_torch = [x.to_torch(torch.float32) if isinstance(x, GGUFTensor) else x for x in (a, b)]
    return torch.cat(as_torch, dim=-2)


def gguf_config(g: GGUFFile) -> dict:
    """GGUF metadata -> a config.json-style dict."""
    arch = g.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{g.path}: GGUF architecture {arch!r} is not supported; edgelm reads "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    m = g.metadata
    config = {"model_type": GGUF_ARCHITECTURES[arch]}
    for key, field in {**GGUF_CONFIG_KEYS, **GGUF_CONFIG_KEYS_BY_ARCH.get(arch, {})}.items():
        if f"{arch}.{key}" in m:
            config[field] = m[f"{arch}.{key}"]
    tokens = m.get("tokenizer.ggml.tokens")
    config["vocab_size"] = m.get(f"{arch}.vocab_size", len(tokens) if tokens else None)
    config["tie_word_embeddings"] = "output.weight" not in g.tensors
    if arch in GGUF_CONFIG_FIXUPS:
        GGUF_CONFIG_FIXUPS[arch](g, config)
    config["rope_parameters"] = _gguf_rope(g, arch, config)
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in m:
            config[key] = m[f"tokenizer.ggml.{key}"]
    return config


def _gguf_rope(g: GGUFFile, arch: str, config: dict) -> dict:
    m = g.metadata
    params = {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    kind = m.get(f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        params["rope_type"] = kind
        params["factor"] = m[f"{arch}.rope.scaling.factor"]
        orig = m.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            params["original_max_position_embeddings"] = orig
    if "rope_freqs.weight" in g.tensors:
        params["freq_factors"] = g.tensors["rope_freqs.weight"].to_torch().tolist()
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rot = m.get(f"{arch}.rope.dimension_count")
    if rot and rot != head_dim:
        params["partial_rotary_factor"] = rot / head_dim
    return params


def hf_tensor_name(name: str, arch: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for unused tensors."""
    parts = name.split(".")
    table = {**GGUF_TENSOR_NAMES, **GGUF_TENSOR_NAMES_BY_ARCH.get(arch, {})}
    if parts[0] == "blk":
        full = GGUF_LAYER_TENSOR_NAMES_BY_ARCH.get(arch, {}).get(".".join(parts[2:]))
        if full is not None:
            return f"model.layers.{parts[1]}.{full}"
        base = table.get(parts[2])
        return None if base is None else f"model.layers.{parts[1]}.{base}.{parts[-1]}"
    base = table.get(parts[0])
    return None if base is None else f"{base}.{parts[-1]}"


def gguf_tensors(g: GGUFFile, config: dict) -> dict[str, GGUFTensor]:
    """{HF name: GGUFTensor} with llama.cpp's Q/K row permutation undone (on the raw rows)."""
    from edgelm.layers.rope import interleaved_to_half

    arch, out = g.architecture, {}
    for name, t in g.tensors.items():
        hf = hf_tensor_name(name, arch)
        if hf is None:
            continue
        if arch in PERMUTED_QK and (".q_proj." in hf or ".k_proj." in hf) and hf.endswith("weight"):
            heads = config["num_attention_heads" if ".q_proj." in hf else "num_key_value_heads"]
            rows = interleaved_to_half(torch.arange(t.shape[0]), heads).numpy()
            t = GGUFTensor(t.name, t.type_name, t.shape, np.asarray(t.data)[rows])
        if arch in GGUF_LAYER_TENSOR_NAMES_BY_ARCH:
            t = ssm_tensor(hf, t)
        out[hf] = t
    return merge_gate_up(out)
