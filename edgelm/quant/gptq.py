"""GPTQ and P-GPTQ weight quantization (int4 group-wise / int8 per channel).

GPTQ (Frantar et al. 2022, arXiv:2210.17323) quantizes a linear's weight W (N, K) column by column,
minimising ||W X - Ŵ X||² over calibration inputs X (K, n): after rounding column j, the error
e = (w_j - ŵ_j) / [H⁻¹]_jj is spread over the columns not yet quantized, w_{j+1:} -= e [H⁻¹]_{j,j+1:},
with H = X Xᵀ (+ damping) and its inverse taken through an upper Cholesky factor. Updates are
applied lazily: inside a block of columns exactly, to the columns after the block in one matmul.

P-GPTQ (MiniCPM4 report; ../shared/docs/TECHNIQUES.md §3): the first tokens of every sequence
(BOS and its neighbours) carry ~10x larger activations and dominate H, so H is built from the
positions s >= prefix_skip only; the layer's forward still sees (and passes on) every position.

The driver runs layer by layer: the calibration hidden states entering one decoder layer are the
only activations held; each target linear is wrapped by `HessianCapture` for one pass, quantized,
and the layer is run again (now quantized) to produce the next layer's inputs.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from torch import nn

from edgelm.quant.linear import Int4Linear, Int8Linear, to_quantized
from edgelm.quant.primitives import (
    check_bits,
    check_int4_shape,
    check_int8_shape,
    int4_codes,
    int4_group_params,
    int4_values,
    int8_codes,
    int8_row_scale,
)
from edgelm.quant.quantize import (
    get_module,
    is_default_target,
    record_quantization,
    set_module,
    tie_quantized_embeddings,
    tied_embeddings,
)

_CALLS = itertools.count()  # HessianCapture.first_call order
CALIB_CHARS = 2_000_000  # calibrate on the first 2 MB of the text (the last 1 MB is for evaluation)


# ---- the Hessian -------------------------------------------------------------------------------


class HessianCapture(nn.Module):
    """Wraps a linear for one calibration pass: forwards unchanged and accumulates H = Σ x xᵀ over
    the rows of its input x (B, L, K), leaving out positions < prefix_skip (P-GPTQ). Softened
    P-GPTQ: `prefix_weight` > 0 keeps those positions at that weight; `prefix_spike` r leaves them
    out (or down-weights them) only where max |x| over them is > r times max |x| over the rest
    (the layers whose inputs carry the attention-sink spikes); elsewhere H is GPTQ's.

    Wrappers given the same `shared` dict reuse one x xᵀ product when they see the same input
    tensor object (q/k/v, gate/up). The entry holds x itself, so its memory cannot be freed and
    handed to a later input while the entry lives (keying on the address alone once gave gate/up
    the x xᵀ of q/k/v: post_attention_layernorm's output reused input_layernorm's freed buffer).
    Clear it between forward calls.
    """

    def __init__(self, linear: nn.Linear, prefix_skip: int = 0, shared: dict | None = None,
                 prefix_weight: float = 0.0, prefix_spike: float | None = None):
        super().__init__()
        self.linear, self.prefix_skip = linear, prefix_skip
        self.prefix_weight, self.prefix_spike = prefix_weight, prefix_spike
        K = linear.in_features
        self.H = torch.zeros(K, K, dtype=torch.float64)  # positions >= prefix_skip
        self.Hp = torch.zeros(K, K, dtype=torch.float64) if prefix_skip else None  # positions < prefix_skip
        self.rows, self.prefix_rows, self.peak, self.prefix_peak = 0, 0, 0.0, 0.0
        self.shared = {} if shared is None else shared
        self.first_call: tuple[int, int] | None = None  # (call order, id of its input): true-sequential groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.add(x)
        return self.linear(x)

    def add(self, x: torch.Tensor) -> None:
        if self.first_call is None:
            self.first_call = (next(_CALLS), id(x))
        key = (id(x), self.prefix_skip)
        if key not in self.shared or self.shared[key][0] is not x:
            split = self.prefix_skip if x.dim() == 3 else 0
            rows = x[:, split:].reshape(-1, x.shape[-1]).float() if split else x.reshape(-1, x.shape[-1]).float()
            entry = [x, rows.T @ rows, rows.shape[0], float(rows.abs().max()) if rows.numel() else 0.0]
            if split:  # fp32 per batch, summed in fp64
                pre = x[:, :split].reshape(-1, x.shape[-1]).float()
                entry += [pre.T @ pre, pre.shape[0], float(pre.abs().max())]
            self.shared[key] = entry
        _, xtx, n, peak, *prefix = self.shared[key]
        self.H += xtx
        self.rows, self.peak = self.rows + n, max(self.peak, peak)
        if prefix:
            self.Hp += prefix[0]
            self.prefix_rows, self.prefix_peak = self.prefix_rows + prefix[1], max(self.prefix_peak, prefix[2])

    def prefix_weight_used(self) -> float:
        """The weight the positions < prefix_skip get in H: 1 where `prefix_spike` finds no spike."""
        if self.prefix_spike is not None and self.prefix_peak <= self.prefix_spike * self.peak:
            return 1.0
        return self.prefix_weight

    def hessian(self) -> torch.Tensor:
        """The mean x xᵀ (K, K) fp32 (the scale does not change GPTQ, damping is relative)."""
        w = self.prefix_weight_used() if self.prefix_rows else 0.0
        rows = self.rows + w * self.prefix_rows
        if rows == 0:
            raise ValueError("no calibration rows reached this layer (is --prefix-skip >= --seq-len?)")
        H = self.H + w * self.Hp if w else self.H
        return (H / rows).float()


# ---- one weight --------------------------------------------------------------------------------


class Grid:
    """The rounding grid of one weight: int4 groups (scale, zero per group of columns, the CPU
    kernel's W = (q - 8) s + z) or int8 rows (W = q s). `group_size` may be any divisor of K here;
    the kernel's own shape rules are checked by the driver."""

    def __init__(self, bits: int, N: int, K: int, group_size: int, symmetric: bool, mse: bool = False):
        check_bits(bits, N, K)
        if bits == 4 and K % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {K} (weight ({N}, {K}))")
        self.bits, self.symmetric, self.mse = bits, symmetric, mse
        self.group_size = group_size if bits == 4 else K
        G = K // self.group_size
        self.scales = torch.zeros(N, G, dtype=torch.bfloat16)
        self.zeros = torch.zeros(N, G, dtype=torch.bfloat16)

    def fit(self, group: int, w: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Set group `group`'s parameters from its current columns w (N, group_size). With `mse`
        (int4), the range is shrunk by the factor of CLIP_GRID that minimises each row's rounding
        error Σ_k weight_k (w_k - ŵ_k)² (weight: the columns' H diagonal, or 1)."""
        if self.bits == 4:
            s, z = mse_group_params(w.float(), self.symmetric, weight) if self.mse else int4_group_params(w.float(), self.symmetric)
        else:
            s, z = int8_row_scale(w), torch.zeros(w.shape[0], dtype=torch.bfloat16)
        self.scales[:, group], self.zeros[:, group] = s, z

    def fit_all(self, w: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        for g in range(self.scales.shape[1]):
            cols = slice(g * self.group_size, (g + 1) * self.group_size)
            self.fit(g, w[:, cols], None if weight is None else weight[cols])

    def round(self, w: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column w (N,) of original index `col` -> (codes (N,), dequantized values (N,) fp32)."""
        g = col // self.group_size
        s, z = self.scales[:, g], self.zeros[:, g]
        if self.bits == 4:
            q = int4_codes(w, s, z)
            return q, int4_values(q, s, z)
        q = int8_codes(w, s)
        return q, q.float() * s.float()

    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits == 4 else torch.int8


CLIP_GRID = tuple(1 - 0.025 * i for i in range(17))  # 1.0 .. 0.6: the range shrink factors tried


def mse_group_params(w: torch.Tensor, symmetric: bool = False, weight: torch.Tensor | None = None):
    """int4 (scale, zero) bf16 (N,) of the group w (N, group) minimising Σ weight (w - ŵ)² per row
    over the ranges [p lo, p hi] (p in CLIP_GRID; asymmetric) or the scales p * s (symmetric)."""
    best_err = torch.full((w.shape[0],), float("inf"))
    best_s = best_z = None
    wt = torch.ones(w.shape[1]) if weight is None else weight.float()
    for p in CLIP_GRID:
        s, z = int4_group_params(w * p, symmetric)  # the range of w shrunk by p (the grid of p w)
        err = ((int4_values(int4_codes(w, s[:, None], z[:, None]), s[:, None], z[:, None]) - w) ** 2 * wt).sum(1)
        better = err < best_err
        if best_s is None:
            best_s, best_z = s.clone(), z.clone()
        best_s[better], best_z[better], best_err[better] = s[better], z[better], err[better]
    return best_s, best_z


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = Uᵀ U, λ = damp * mean(diag H): row j of U holds
    the [H⁻¹] entries GPTQ needs once columns < j are fixed (the OBS update, GPTQ eq. 2-4)."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean().clamp_min(1e-8))
    try:
        L = torch.linalg.cholesky(H)
    except torch.linalg.LinAlgError:
        raise ValueError("the damped Hessian is not positive definite: raise --damp") from None
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_weight(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    symmetric: bool = False,
    mse: bool = False,
) -> tuple[torch.Tensor, Grid, torch.Tensor]:
    """GPTQ one weight w (N, K) against H (K, K) -> (codes (N, K), grid, dequantized Ŵ (N, K) fp32).

    Group parameters are fitted from the error-updated columns when a group starts; with
    `act_order` (columns by decreasing H_jj) they are fitted up front from W ("static groups"),
    so groups stay contiguous in the original column order the kernel needs. `mse`: group ranges
    by the clip search of `mse_group_params`, rows' errors weighted by the H diagonal.
    """
    N, K = w.shape
    grid = Grid(bits, N, K, group_size, symmetric, mse)
    W, H = w.detach().float().clone(), H.float().clone()
    dead = H.diagonal() == 0  # inputs that are always 0: any value works, take 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K)
    static = act_order or bits == 8
    if static:
        grid.fit_all(W, H.diagonal())
    W, U = W[:, perm], inverse_hessian_factor(H[perm][:, perm], damp)
    codes, Wq = torch.empty(N, K, dtype=grid.code_dtype()), torch.empty(N, K)
    block = block_size if bits == 8 else math.ceil(block_size / grid.group_size) * grid.group_size
    for a in range(0, K, block):
        b = min(a + block, K)
        err = _quantize_block(W[:, a:b], U[a:b, a:b], perm[a:b], grid, static, codes, Wq, H.diagonal())
        W[:, b:] -= err @ U[a:b, b:]  # the lazy batch update of every later column
    return codes, grid, Wq


def _quantize_block(Wb, Ub, cols, grid: Grid, static: bool, codes, Wq, hdiag) -> torch.Tensor:
    """Columns Wb (N, B) in place, in order; returns the scaled errors E (N, B) for the lazy update.
    `cols` (B,) are the original column indices (codes and Ŵ are written there)."""
    E = torch.empty_like(Wb)
    for i in range(Wb.shape[1]):
        col = int(cols[i])
        if not static and col % grid.group_size == 0:  # groups lie inside blocks (block % group == 0)
            grid.fit(col // grid.group_size, Wb[:, i : i + grid.group_size], hdiag[col : col + grid.group_size])
        q, wq = grid.round(Wb[:, i], col)
        codes[:, col], Wq[:, col] = q, wq
        E[:, i] = (Wb[:, i] - wq) / Ub[i, i]
        Wb[:, i + 1 :] -= E[:, i : i + 1] * Ub[i : i + 1, i + 1 :]
    return E


def rtn_weight(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
               mse: bool = False) -> torch.Tensor:
    """Round-to-nearest on the same grid (the baseline GPTQ must beat): Ŵ (N, K) fp32."""
    return rtn_codes(w, bits, group_size, symmetric, mse)[2]


def rtn_codes(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False, mse: bool = False):
    """Round-to-nearest -> (codes (N, K), grid, Ŵ (N, K) fp32), like `gptq_weight`."""
    N, K = w.shape
    grid = Grid(bits, N, K, group_size, symmetric, mse)
    grid.fit_all(w.float())
    codes, Wq = torch.empty(N, K, dtype=grid.code_dtype()), torch.empty(N, K)
    for g in range(K // grid.group_size):  # one group of columns at a time (the grid is per group)
        cols = slice(g * grid.group_size, (g + 1) * grid.group_size)
        s, z = grid.scales[:, g : g + 1], grid.zeros[:, g : g + 1]
        if bits == 4:
            codes[:, cols] = int4_codes(w[:, cols], s, z)
            Wq[:, cols] = int4_values(codes[:, cols], s, z)
        else:
            codes[:, cols] = int8_codes(w[:, cols].float(), s)
            Wq[:, cols] = codes[:, cols].float() * s.float()
    return codes, grid, Wq


def reconstruction_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    """||W X - Ŵ X||² per calibration row = trace(D H Dᵀ), D = W - Ŵ, H = mean x xᵀ."""
    D = (w.float() - wq.float()).double()
    return float(((D @ H.double()) * D).sum())


def to_kernel_module(codes: torch.Tensor, grid: Grid, bias) -> nn.Module:
    """The runtime module that multiplies by exactly the dequantized Ŵ GPTQ produced."""
    if grid.bits == 4:
        return Int4Linear.from_quantized(codes, grid.scales, grid.zeros, grid.group_size, bias)
    return Int8Linear.from_quantized(codes, grid.scales[:, 0], bias)


# ---- the model driver ----------------------------------------------------------------------------


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple]:
    """What decoder layer 0 receives for each batch (B, L): [(hidden (B, L, D), ctx)]."""
    captured = []

    def grab(module, args):
        captured.append((args[0], args[2]))  # layer(x, cache, ctx)
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(grab)
    try:
        for tokens in batches:
            try:
                model(tokens)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def check_targets(model: nn.Module, targets: dict, bits: int, group_size: int) -> None:
    if not targets:
        raise ValueError(f"GPTQ: {type(model).__name__} has no nn.Linear layer to quantize")
    for path, m in targets.items():
        try:
            check_bits(bits, m.out_features, m.in_features)
            if bits == 4:
                check_int4_shape(m.out_features, m.in_features, group_size)
            else:
                check_int8_shape(m.out_features, m.in_features)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def as_batches(calib_tokens, batch_size: int) -> list[torch.Tensor]:
    tokens = calib_tokens if isinstance(calib_tokens, torch.Tensor) else torch.stack(list(calib_tokens))
    if tokens.dim() != 2 or len(tokens) == 0:
        raise ValueError(f"calibration tokens must be (samples, seq_len), got shape {tuple(tokens.shape)}")
    return list(tokens.long().split(batch_size))


@torch.no_grad()
def gptq_quantize(
    model: nn.Module,
    calib_tokens: list[torch.Tensor] | torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    prefix_skip: int = 0,
    prefix_weight: float = 0.0,
    prefix_spike: float | None = None,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    symmetric: bool = False,
    mse: bool = False,
    head_bits: int | None = None,
    head_gptq: bool = False,
    true_sequential: bool = False,
    int8_layers: tuple[int, ...] = (),
    predicate=None,
    batch_size: int = 8,
    progress: bool = True,
) -> nn.Module:
    """GPTQ (P-GPTQ when prefix_skip > 0) every target linear of the decoder layers in place, then
    the LM head, by default round-to-nearest with the same bits and groups as `quantize_model`
    (`head_bits` 8: int8 per channel; `head_gptq`: GPTQ on the final normed hidden states), the tied
    embedding reading its quantized rows; records the layout. Load the model with fuse=False.

    `prefix_weight` (0..1, with prefix_skip > 0): positions < prefix_skip stay in H at that weight
    instead of being left out; `prefix_spike` r: only in linears whose input peaks over those
    positions exceed r times the peak over the rest (`HessianCapture`). `mse`: clip-searched group ranges (`mse_group_params`), also for a
    round-to-nearest int4 head. `true_sequential`: within a layer, each input group's H is taken
    after the groups before it are quantized (`_quantize_layer`). `int8_layers`: decoder layers
    (indices) whose linears get int8 per channel instead of `bits` (a k-quant-style mix for the
    layers whose quantization costs most; `benchmarks/compression.py --sensitivity` ranks them)."""
    predicate = predicate or is_default_target
    all_targets = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear) and predicate(p, m)}
    check_targets(model, all_targets, bits, group_size)
    head_bits = head_bits or bits
    layer_paths = {p for p, m in model.named_modules() if any(m is l for l in model.layers)}
    outside = {p: m for p, m in all_targets.items() if not any(p.startswith(lp + ".") for lp in layer_paths)}
    if outside:
        check_targets(model, outside, head_bits, group_size)
    if prefix_skip < 0:
        raise ValueError(f"prefix_skip must be >= 0, got {prefix_skip}")
    if not 0 <= prefix_weight <= 1:
        raise ValueError(f"prefix_weight must be in [0, 1], got {prefix_weight}")
    ties = tied_embeddings(model, all_targets)
    states = layer_inputs(model, as_batches(calib_tokens, batch_size))
    settings = dict(bits=bits, group_size=group_size, act_order=act_order, damp=damp, block_size=block_size,
                    symmetric=symmetric, mse=mse)
    capture = dict(prefix_skip=prefix_skip, prefix_weight=prefix_weight, prefix_spike=prefix_spike)
    rest = dict(all_targets)
    bad = [i for i in int8_layers if not 0 <= i < len(model.layers)]
    if bad:
        raise ValueError(f"int8_layers {bad} out of range: the model has {len(model.layers)} decoder layers")
    for i, layer in enumerate(_progress(list(model.layers), progress, "GPTQ layers")):
        prefix = next(p for p, m in model.named_modules() if m is layer) + "."
        targets = {p: rest.pop(p) for p in list(rest) if p.startswith(prefix)}
        layer_settings = {**settings, "bits": 8} if i in int8_layers else settings
        _quantize_layer(model, layer, states, targets, capture, layer_settings, true_sequential)
        states = [(layer(h, None, ctx), ctx) for h, ctx in states]  # inputs of the next layer
    head = {**settings, "bits": head_bits}
    if head_gptq and rest:  # the final norm's output is what the LM head multiplies
        norm = model.model.norm
        states = [(norm(h), ctx) for h, ctx in states]
        run = lambda h, cache, ctx: [get_module(model, p).add(h) for p in rest]  # noqa: E731 (H only, no logits)
        _quantize_layer(model, run, states, dict(rest), capture, head)
    else:
        for path, m in rest.items():  # outside the decoder layers (the LM head): round to nearest
            if mse:
                codes, grid, _ = rtn_codes(m.weight.detach(), head_bits, group_size, symmetric, mse)
                set_module(model, path, to_kernel_module(codes, grid, m.bias))
            else:
                set_module(model, path, to_quantized(m, "int4" if head_bits == 4 else "int8", group_size, symmetric))
    tie_quantized_embeddings(model, ties)
    method = "gptq" if prefix_skip == 0 else "p-gptq"
    record_quantization(model, method, group_size, symmetric)
    return model


def capture_hessians(model, layer, states, targets: dict, capture: dict) -> dict[str, HessianCapture]:
    """One calibration pass through `layer` (called as layer(h, None, ctx)) with every target
    wrapped: {path: its HessianCapture}. capture: HessianCapture's prefix_skip / prefix_weight."""
    shared = {}
    wrappers = {p: HessianCapture(m, shared=shared, **capture) for p, m in targets.items()}
    for p, w in wrappers.items():
        set_module(model, p, w)
    try:
        for h, ctx in states:
            shared.clear()
            layer(h, None, ctx)
    finally:
        for p, w in wrappers.items():
            set_module(model, p, w.linear)
    return wrappers


def input_groups(wrappers: dict[str, HessianCapture]) -> list[list[str]]:
    """The targets in the order the layer first called them, grouped by shared input: a Llama
    layer gives [q, k, v], [o], [gate, up], [down]."""
    order = sorted(wrappers, key=lambda p: wrappers[p].first_call[0])
    groups: list[list[str]] = []
    for p in order:
        if groups and wrappers[groups[-1][0]].first_call[1] == wrappers[p].first_call[1]:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _quantize_layer(model, layer, states, targets: dict, capture: dict, settings: dict, sequential: bool = False) -> None:
    """Capture every target's H in one pass through `layer`, then GPTQ each target. `sequential`
    (the GPTQ reference's --true-sequential): one input group at a time, each group's H captured
    again with the groups before it already quantized, so o_proj and down_proj fit the inputs the
    quantized q/k/v and gate/up actually produce."""
    wrappers = capture_hessians(model, layer, states, targets, capture)
    missing = [p for p, w in wrappers.items() if w.first_call is None]
    if missing:
        raise ValueError(f"no calibration input reached {missing[:3]}: the layer never called them")
    groups = input_groups(wrappers) if sequential else [list(wrappers)]
    for i, group in enumerate(groups):
        if i:
            wrappers = capture_hessians(model, layer, states, {p: targets[p] for p in group}, capture)
        for p in group:
            w = wrappers[p]
            codes, grid, _ = gptq_weight(w.linear.weight, w.hessian(), **settings)
            set_module(model, p, to_kernel_module(codes, grid, w.linear.bias))


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="layer")


# ---- calibration data and the CLI entry --------------------------------------------------------


def calibration_tokens(tokenizer, text_path: str | Path, samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) token ids: consecutive non-overlapping windows of the first 2 MB of the
    text. Every window starts at a fresh sequence start (no BOS is added: the first positions are
    whatever text starts there, as in the P-GPTQ setting)."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"--samples must be >= 1 and --seq-len >= 2, got {samples} and {seq_len}")
    path = Path(text_path)
    if not path.is_file():
        raise ValueError(f"{text_path}: no such calibration text file")
    ids = tokenizer.encode(path.read_text(errors="replace")[:CALIB_CHARS])
    need = samples * seq_len
    if len(ids) < need:
        raise ValueError(
            f"calibration text {text_path} gives {len(ids)} tokens (first 2 MB), fewer than "
            f"--samples {samples} x --seq-len {seq_len} = {need}: lower them or use a longer text"
        )
    return torch.as_tensor(ids[:need], dtype=torch.long).reshape(samples, seq_len)


def gptq_quantize_from_args(model: nn.Module, args) -> nn.Module:
    """`edgelm quantize --method gptq|p-gptq`: reads --calib, --samples, --seq-len, --prefix-skip,
    --bits, --group-size, --act-order (and --damp, --symmetric, --mse, --head-bits, --head-gptq,
    --true-sequential, --int8-layers, --prefix-weight if present). `gptq` ignores --prefix-skip and --prefix-weight."""
    if getattr(args, "calib", None) is None:
        raise ValueError(f"--method {args.method} needs --calib FILE (calibration text)")
    tokens = calibration_tokens(model.tokenizer, args.calib, args.samples, args.seq_len)
    skip = args.prefix_skip if args.method == "p-gptq" else 0
    if skip >= args.seq_len:
        raise ValueError(f"--prefix-skip {skip} leaves no position of --seq-len {args.seq_len} for the Hessian")
    return gptq_quantize(
        model, tokens, bits=args.bits, group_size=args.group_size, prefix_skip=skip,
        act_order=args.act_order, damp=getattr(args, "damp", 0.01), symmetric=getattr(args, "symmetric", False),
        mse=getattr(args, "mse", False), head_bits=getattr(args, "head_bits", None),
        head_gptq=getattr(args, "head_gptq", False), true_sequential=getattr(args, "true_sequential", False),
        int8_layers=tuple(getattr(args, "int8_layers", None) or ()),
        prefix_weight=getattr(args, "prefix_weight", 0.0) if skip else 0.0,
        prefix_spike=getattr(args, "prefix_spike", None) if skip else None,
    )


# ---- the activation profile that motivates P-GPTQ ----------------------------------------------


@torch.no_grad()
def down_proj_profile(model: nn.Module, calib_tokens: torch.Tensor, positions: int = 16) -> torch.Tensor:
    """max |x| (layers, positions) of each layer's MLP down-projection input at the first
    `positions` positions, over the calibration batch (B, L)."""
    out = torch.zeros(len(model.layers), positions)
    hooks = []
    for i, layer in enumerate(model.layers):
        def grab(module, args, i=i):
            x = args[0][:, :positions].abs()  # (B, P, F)
            out[i, : x.shape[1]] = torch.maximum(out[i, : x.shape[1]], x.amax(dim=(0, 2)).float())
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(grab))
    try:
        for batch in calib_tokens.long().split(8):
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return out


def plot_profile(profile: torch.Tensor, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = ax.imshow(profile.log10().numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("layer")
    ax.set_title("log10 max |x|, down_proj input")
    fig.colorbar(im, ax=ax)
    ratio = profile[:, :4].amax(1) / profile[:, 4:].amax(1).clamp_min(1e-12)
    spiky = ratio.argsort(descending=True)[:3].tolist()  # the layers P-GPTQ is about
    for i in sorted({*spiky, 0, len(profile) // 2}):
        ax2.semilogy(profile[i].numpy(), marker="o", ms=3, label=f"layer {i} (x{float(ratio[i]):.1f})")
    ax2.axvline(3.5, color="grey", ls="--", lw=1)
    ax2.set_xlabel("position in sequence")
    ax2.set_ylabel("max |x|  (legend: max over 0-3 / max over 4+)")
    ax2.legend(fontsize=8)
    ax2.set_title("positions < 4 are left out of H by P-GPTQ (--prefix-skip 4)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
