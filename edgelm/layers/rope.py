"""Rotary position embeddings and the scaled variants Hugging Face configs name.

`rope_parameters` is the Hugging Face dict ({"rope_type", "rope_theta", "factor", ...}); older
configs spell it `rope_scaling` + `rope_theta`, which `normalize_rope_parameters` folds into one.
Each variant only changes the inverse frequencies (and, for yarn/longrope, a cos/sin scale).
"""

import math

import torch
from torch import nn


def normalize_rope_parameters(
    rope_parameters: dict | None,
    rope_scaling: dict | None,
    rope_theta: float | None,
    max_position_embeddings: int,
    original_max_position_embeddings: int | None = None,
    default_theta: float = 10000.0,
) -> dict:
    """One dict with `rope_type` and `rope_theta` always present, as transformers standardises it."""
    params = dict(rope_parameters or rope_scaling or {})
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", rope_theta if rope_theta is not None else default_theta)
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if original_max_position_embeddings is not None:
            params["original_max_position_embeddings"] = original_max_position_embeddings
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(p: dict, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(p["rope_theta"], dim)
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(p: dict, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    # YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, linear ramp between.
    base, orig = p["rope_theta"], p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig
    attn = p.get("attention_factor")
    if attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn)


def _longrope(p: dict, dim: int, max_pos: int, long: bool) -> tuple[torch.Tensor, float]:
    # LongRoPE (Phi-3, MiniCPM4): per-frequency rescale factors, "long" set beyond the original length.
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig
    attn = p.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = torch.tensor(p["long_factor"] if long else p["short_factor"], dtype=torch.float32)
    inv_freq = 1.0 / (ext * p["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    return inv_freq, float(attn)


def rope_inv_freq(p: dict, dim: int, max_pos: int, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inv_freq (dim/2,), cos/sin scale) for one rope_parameters dict."""
    inv_freq, scale = _rope_inv_freq(p, dim, max_pos, long)
    if p.get("freq_factors") is not None:
        # GGUF files bake Llama 3 scaling into a `rope_freqs` tensor that divides the frequencies.
        inv_freq = inv_freq / torch.as_tensor(p["freq_factors"], dtype=torch.float32)
    return inv_freq, scale


def _rope_inv_freq(p: dict, dim: int, max_pos: int, long: bool) -> tuple[torch.Tensor, float]:
    kind = p["rope_type"]
    if kind == "default":
        return _base_inv_freq(p["rope_theta"], dim), 1.0
    if kind == "linear":
        return _base_inv_freq(p["rope_theta"], dim) / p["factor"], 1.0
    if kind == "llama3":
        return _llama3(p, dim), 1.0
    if kind == "yarn":
        return _yarn(p, dim, max_pos)
    if kind == "longrope":
        return _longrope(p, dim, max_pos, long)
    raise ValueError(f"unsupported rope_type {kind!r}: edgelm knows default, linear, llama3, yarn, longrope")


class RoPE(nn.Module):
    """Computes (cos, sin) for positions; `dim` may be < head_dim (partial rotary)."""

    def __init__(self, dim: int, rope_parameters: dict, max_position_embeddings: int):
        super().__init__()
        self.dim, self.params, self.max_pos = dim, rope_parameters, max_position_embeddings
        with torch.device("cpu"):  # real tables even when the model is built on the meta device
            inv_freq, self.scale = rope_inv_freq(rope_parameters, dim, max_position_embeddings)
            self.long_inv_freq = None
            if rope_parameters["rope_type"] == "longrope":
                self.long_inv_freq, _ = rope_inv_freq(rope_parameters, dim, max_position_embeddings, True)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        # LongRoPE switches to the long factors once the sequence passes the original length,
        # as transformers does (decided by the largest position in this call).
        if self.long_inv_freq is not None:
            if int(positions.max()) + 1 > self.params["original_max_position_embeddings"]:
                return self.long_inv_freq
        return self.inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, L) -> cos, sin (B, 1, L, dim) in fp32, ready to broadcast over heads."""
        freqs = positions[..., None].float() * self._inv_freq_for(positions)  # (B, L, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale)[:, None], (emb.sin() * self.scale)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D); rotate the first cos.shape[-1] dims (rotate-half layout, as in HF)."""
    d = cos.shape[-1]
    if d == x.shape[-1] and x.dtype == torch.float32:
        return x * cos + rotate_half(x) * sin  # full rotary in fp32: no slicing or casts
    rot, rest = x[..., :d], x[..., d:]
    out = (rot.float() * cos + rotate_half(rot.float()) * sin).to(x.dtype)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K rows from interleaved RoPE pairs (x0,x1),(x2,x3).. to rotate-half (x0,x2..|x1,x3..).

    llama2.c checkpoints and llama.cpp's GGUF (for Llama-family archs) store the interleaved layout.
    Works on any row-major tensor whose first dim is n_heads * head_dim (also raw quantized rows).
    """
    out_dim = w.shape[0]
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
