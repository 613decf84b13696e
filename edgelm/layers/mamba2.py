"""The Mamba-2 mixer (SSD), as Granite 4.0-H and Mamba-2 checkpoints use it.

Shapes: B batch, L tokens, H heads, P head dim, G groups (heads share B and C within a group),
N state size, C conv channels (d_inner + 2·G·N), K conv kernel.

    z | xBC | dt = in_proj(u)                  d_inner | C | H
    x | B | C = silu(causal_depthwise_conv(xBC))
    dt = softplus(dt + dt_bias);  A = -exp(A_log)       (one scalar per head)
    h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t ⊗ B_t;  y_t = h_t·C_t + D·x_t
    out = out_proj(rmsnorm_per_group(y · silu(z)) · w)

Prefill uses the SSD chunked scan (Dao & Gu 2024, "Transformers are SSMs", §6); decode the
single-token recurrence; `mamba2_scan_reference` is that recurrence applied token by token, the
plain reference the chunked scan is tested against. The scan runs in fp32 whatever the weights.
"""

import torch
import torch.nn.functional as F
from torch import nn

from edgelm import kernels
from edgelm.layers.attention import Attention, ForwardContext
from edgelm.layers.mlp import get_activation

# The scan is exact for any chunk size, so the checkpoint's (256, picked for GPUs) is only an upper
# bound: on CPU 128 ran the mixer ~15% faster at 4K-16K tokens (half the l² work per token, GEMMs
# still large) and 64 no better.
MAX_CHUNK_SIZE = 128


def decay_matrix(cum: torch.Tensor) -> torch.Tensor:
    """cum (..., l) cumulative log-decays -> (..., l, l) with [t, s] = exp(cum[t] - cum[s]) for
    t >= s and 0 above the diagonal: how much of step s's input survives at step t.

    The difference of cumulative sums is what mamba_ssm's kernels use too; it loses ~|cum|·2⁻²⁴
    of absolute precision in the exponent, negligible within one chunk. Exponents are clamped to
    [-80, 0]: above the diagonal (positive, masked later) exp would overflow, and below -87 it
    underflows to denormals, which the CPU's exp handles ~2x slower; exp(-80) ≈ 2e-35 is zero for
    every purpose."""
    return (cum[..., :, None] - cum[..., None, :]).clamp_(-80.0, 0.0).exp_()


def mamba2_step(x, dt, A, B, C, h):
    """One token of the recurrence. x (B, H, P), dt (B, H), A (H,), B/C (B, G, N), h (B, H, P, N)
    -> y (B, H, P) without the D skip, new h. Everything fp32; h is not modified in place."""
    H, G = x.shape[1], B.shape[1]
    Bh = B.repeat_interleave(H // G, dim=1)  # (B, H, N)
    Ch = C.repeat_interleave(H // G, dim=1)
    decay = torch.exp(dt * A)[..., None, None]  # (B, H, 1, 1)
    h = torch.addcmul(h * decay, (dt[..., None] * x)[..., None], Bh[:, :, None, :])
    y = (h @ Ch[..., None]).squeeze(-1)  # (B, H, P)
    return y, h


def mamba2_scan_reference(x, dt, A, B, C, h=None):
    """The recurrence token by token: the plain reference for `ssd_chunked_scan`.
    x (B, L, H, P), dt (B, L, H), A (H,), B/C (B, L, G, N), h (B, H, P, N) or None
    -> y (B, L, H, P) without the D skip, final h."""
    Bsz, L, H, P = x.shape
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if h is None:
        h = x.new_zeros(Bsz, H, P, B.shape[-1])
    ys = []
    for t in range(L):
        y, h = mamba2_step(x[:, t], dt[:, t], A.float(), B[:, t], C[:, t], h)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def ssd_chunked_scan(x, dt, A, B, C, chunk_size: int, h=None):
    """The same maths as `mamba2_scan_reference`, a chunk of tokens at a time (exact for any
    chunk size). Per chunk, with a_t = dt_t·A and cum = cumsum(a) inside the chunk:

        y_diag = ((C Bᵀ) ∘ decay) (dt·x)                     quadratic, attention-like, per head
                 decay[t, s] = exp(a_{s+1} + ... + a_t) = exp(cum_t - cum_s), t >= s
        y_off  = (C h_in) · exp(cum)                          what the carried-in state contributes
        h_out  = h_in · exp(cum_last) + Σ_s exp(cum_last - cum_s) (dt·x)_s ⊗ B_s

    Memory is O(H·l²) per chunk: C Bᵀ is one (l, l) matrix per group (no N axis, shared by the
    group's heads), and the (B, chunks, l, l, H, N) tensor of the einsum formulation never exists.
    x (B, L, H, P), dt (B, L, H), A (H,), B/C (B, L, G, N), h (B, H, P, N) or None
    -> y (B, L, H, P) without the D skip, final h (B, H, P, N)."""
    Bsz, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    xdt = (x.float() * dt.float()[..., None]).reshape(Bsz, L, G, H // G * P)  # (B, L, G, hg·P)
    a = dt.float() * A.float()  # (B, L, H) log-decay of each step
    B, C = B.float().transpose(1, 2), C.float().transpose(1, 2)  # (B, G, L, N)
    # Carry the state as (B, G, N, hg·P): the inter-chunk terms are then one GEMM per group.
    h = x.new_zeros(Bsz, H, P, N, dtype=torch.float32) if h is None else h.float()
    S = h.reshape(Bsz, G, H // G, P, N).permute(0, 1, 4, 2, 3).reshape(Bsz, G, N, -1)
    ys = []
    for s in range(0, L, chunk_size):
        e = min(s + chunk_size, L)
        y, S = _ssd_chunk(xdt[:, s:e], a[:, s:e], B[:, :, s:e], C[:, :, s:e], S, P)
        ys.append(y)
    h = S.reshape(Bsz, G, N, H // G, P).permute(0, 1, 3, 4, 2).reshape(Bsz, H, P, N)
    return torch.cat(ys, dim=1), h


def _ssd_chunk(xdt, a, B, C, S, P: int):
    """One chunk of l tokens. xdt (B, l, G, hg·P), a (B, l, H), B/C (B, G, l, N),
    S (B, G, N, hg·P) -> y (B, l, H, P), S after the chunk."""
    Bsz, l, G, _ = xdt.shape
    H = a.shape[-1]
    cum = a.cumsum(dim=1)  # (B, l, H)
    # Intra-chunk: causal "attention" with scores C_t·B_s and decay exp(a_{s+1} + ... + a_t).
    scores = C @ B.transpose(-1, -2)  # (B, G, l, l)
    M = decay_matrix(cum.transpose(1, 2).contiguous())  # (B, H, l, l), still unmasked
    M = M.view(Bsz, G, H // G, l, l).mul_(scores[:, :, None]).view(Bsz, H, l, l).tril_()
    xh = xdt.view(Bsz, l, H, P).transpose(1, 2)  # (B, H, l, P)
    y = (M @ xh).transpose(1, 2)  # (B, l, H, P)
    # Inter-chunk: the state carried in, read by C and decayed to each position.
    y_off = (C @ S).transpose(1, 2).reshape(Bsz, l, H, P)  # (B, l, H, P)
    y = y + y_off * torch.exp(cum)[..., None]
    # State after the chunk: the old one decayed over the whole chunk plus each token's input
    # decayed from its position to the end.
    to_end = torch.exp(cum[:, -1:] - cum)  # (B, l, H)
    xdec = (xdt.view(Bsz, l, H, P) * to_end[..., None]).view(Bsz, l, G, -1).transpose(1, 2)
    total = torch.exp(cum[:, -1]).view(Bsz, G, 1, H // G, 1)
    S = (S.view(Bsz, G, -1, H // G, P) * total).view_as(S) + B.transpose(-1, -2) @ xdec
    return y, S


def causal_conv1d(xBC: torch.Tensor, weight: torch.Tensor, bias, conv_state):
    """Depthwise causal conv over time. xBC (B, L, C), weight (C, K), conv_state (B, C, K-1) of
    the previous inputs or None (zeros) -> (B, L, C) before the activation, new conv_state."""
    Bsz, L, Cdim = xBC.shape
    K = weight.shape[1]
    if conv_state is None:
        past = xBC.new_zeros(Bsz, K - 1, Cdim)
    else:
        past = conv_state.transpose(1, 2).to(xBC.dtype)
    xp = torch.cat([past, xBC], dim=1)  # (B, K-1+L, C)
    w = weight.to(xBC.dtype)
    out = xp[:, K - 1 :] * w[:, K - 1]
    for k in range(K - 1):
        out = torch.addcmul(out, xp[:, k : k + L], w[:, k])
    if bias is not None:
        out = out + bias.to(xBC.dtype)
    return out, xp[:, L:].transpose(1, 2).contiguous()


class GatedRMSNorm(nn.Module):
    """rmsnorm(y · silu(z)) · w, normalised per group of d_inner / G channels, in fp32."""

    def __init__(self, dim: int, num_groups: int = 1, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.num_groups, self.eps = num_groups, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.float() * F.silu(z.float())
        shape = y.shape
        y = y.view(*shape[:-1], self.num_groups, -1)
        y = F.rms_norm(y, (y.shape[-1],), eps=self.eps).view(shape)
        return y * self.weight.float()


class Mamba2Mixer(nn.Module):
    """in_proj, conv1d, dt_bias, A_log, D, norm, out_proj: the Hugging Face names."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        state_size: int,
        num_groups: int = 1,
        conv_kernel: int = 4,
        chunk_size: int = 256,
        eps: float = 1e-6,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        act: str = "silu",
        bias: bool = False,
        conv_bias: bool = True,
    ):
        super().__init__()
        self.num_heads, self.head_dim, self.state_size = num_heads, head_dim, state_size
        self.num_groups, self.chunk_size = num_groups, min(chunk_size, MAX_CHUNK_SIZE)
        self.d_inner = num_heads * head_dim
        self.conv_dim = self.d_inner + 2 * num_groups * state_size
        self.in_proj = nn.Linear(hidden_size, self.d_inner + self.conv_dim + num_heads, bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=conv_bias
        )
        self.dt_bias = nn.Parameter(torch.ones(num_heads))
        self.A_log = nn.Parameter(torch.zeros(num_heads))
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm = GatedRMSNorm(self.d_inner, num_groups, eps)
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=bias)
        self.act = get_activation(act)
        self.time_step_limit = parse_time_step_limit(time_step_limit)

    def state_bytes(self, dtype: torch.dtype, batch: int = 1) -> int:
        """Bytes of this layer's MambaCache: conv state in `dtype`, SSM state in fp32."""
        elt = torch.tensor([], dtype=dtype).element_size()
        conv = self.conv_dim * (self.conv1d.kernel_size[0] - 1) * elt
        ssm = self.num_heads * self.head_dim * self.state_size * 4
        return batch * (conv + ssm)

    def forward(self, u: torch.Tensor, cache, ctx: ForwardContext | None = None) -> torch.Tensor:
        if u.shape[1] == 1 and cache is not None and cache.ssm_state is not None:
            out = self.fast_step(u, cache, ctx)
            if out is not None:
                return out
        Bsz, L, _ = u.shape
        H, P, G, N = self.num_heads, self.head_dim, self.num_groups, self.state_size
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, H], dim=-1)
        valid = padding_mask(ctx) if ctx is not None else None  # (B, L) bool, False on left padding
        if valid is not None:  # padded inputs are zeros, as if the sequence started later
            xBC = xBC * valid[..., None].to(xBC.dtype)
        conv_state = cache.conv_state if cache is not None else None
        xBC, conv_state = causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)
        x, B, C = self.act(xBC).split([self.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, H)
        if valid is not None:  # dt = 0 and x = 0: a padded step leaves the state unchanged
            dt = dt * valid[..., None]
            x = x * valid[..., None].to(x.dtype)
        x = x.reshape(Bsz, L, H, P)
        B, C = B.reshape(Bsz, L, G, N), C.reshape(Bsz, L, G, N)
        A = -torch.exp(self.A_log.float())
        h = cache.ssm_state if cache is not None else None
        if L == 1 and h is not None:
            # transformers and mamba_ssm clamp dt to time_step_limit in the scan, not in the step.
            y, h = mamba2_step(x[:, 0].float(), dt[:, 0], A, B[:, 0].float(), C[:, 0].float(), h)
            y = y[:, None]
        else:
            dt = dt.clamp(*self.time_step_limit)
            y, h = ssd_chunked_scan(x, dt, A, B, C, self.chunk_size, h)
        y = y + x.float() * self.D.float()[:, None]  # D skip
        if cache is not None:
            cache.update(conv_state, h, L)
        y = self.norm(y.reshape(Bsz, L, self.d_inner), z)
        return self.out_proj(y.to(u.dtype))

    def fast_step(self, u: torch.Tensor, cache, ctx: ForwardContext | None) -> torch.Tensor | None:
        """One decode token with everything between in_proj and out_proj in one C++ call
        (`kernels/cpu.cpp: mamba_step`; the module path below is its reference), or None when it
        does not apply. Per token it replaces ~35 small torch ops and four passes over the state."""
        ext = kernels.ext() if self.__dict__.get("fast", True) else None
        if ext is None or torch.is_grad_enabled() or u.dtype != torch.float32 or self.act is not F.silu:
            return None
        if cache.conv_state.dtype != torch.float32 or (ctx is not None and padding_mask(ctx) is not None):
            return None
        Bsz = u.shape[0]
        y, conv_state, h = ext.mamba_step(
            kernels.linear(self.in_proj, u).view(Bsz, -1),
            self.conv1d.weight[:, 0],
            self.conv1d.bias,
            cache.conv_state,
            self.dt_bias,
            -torch.exp(self.A_log.float()),
            self.D,
            self.norm.weight,
            cache.ssm_state,
            self.num_groups,
            self.norm.eps,
        )
        cache.update(conv_state, h, 1)
        return kernels.linear(self.out_proj, y.view(Bsz, 1, -1))


def parse_time_step_limit(limit) -> tuple[float, float]:
    """(lo, hi) from a config value; transformers 5 writes inf as {"__float__": "Infinity"}."""
    if limit is None:
        return 0.0, float("inf")
    lo, hi = (float(v["__float__"]) if isinstance(v, dict) else float(v) for v in limit)
    return lo, hi


def padding_mask(ctx: ForwardContext) -> torch.Tensor | None:
    """(B, L) bool, True where the token is real; None when no position of this call is padding."""
    if ctx.left_pad is None or ctx.offset >= int(ctx.left_pad.max()):
        return None
    key = ("ssm_valid",)
    if key not in ctx._memo:
        pos = torch.arange(ctx.offset, ctx.offset + ctx.length)
        ctx._memo[key] = pos[None, :] >= ctx.left_pad[:, None]
    return ctx._memo[key]


def state_bytes_per_sequence(model: nn.Module, dtype: torch.dtype) -> int:
    """Fixed bytes one sequence's Mamba states take across all Mamba layers (0 for transformers)."""
    return sum(m.state_bytes(dtype) for m in model.modules() if isinstance(m, Mamba2Mixer))


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """K and V bytes one token adds across the attention layers only (Mamba layers add none)."""
    elt = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * m.num_kv_heads * m.head_dim * elt for m in model.modules() if isinstance(m, Attention))
