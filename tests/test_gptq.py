"""GPTQ / P-GPTQ (edgelm/quant/gptq.py): the reconstruction error ||WX - ŴX||² beats round-to-nearest
on every linear of stories260K and on a random layer with correlated inputs; the kernel modules
multiply by exactly the weights GPTQ chose; P-GPTQ's Hessian leaves out the first positions and
with prefix_skip 0 is GPTQ; bad input fails with a clear error."""

import argparse

import pytest
import torch
from torch import nn

from edgelm.loader import load
from edgelm.quant.gptq import (
    HessianCapture,
    as_batches,
    calibration_tokens,
    capture_hessians,
    gptq_quantize,
    gptq_quantize_from_args,
    gptq_weight,
    input_groups,
    layer_inputs,
    mse_group_params,
    reconstruction_error,
    rtn_weight,
    to_kernel_module,
)
from edgelm.quant.quantize import can_quantize, is_default_target

torch.set_num_threads(1)
STORIES = "/work/shared/models/stories260K/hf"
TEXT = "/work/shared/data/python-library-docs.txt"


@pytest.fixture(scope="module")
def stories():
    return load(STORIES, dtype=torch.float32, fuse=False)


@pytest.fixture(scope="module")
def calib(stories):
    return calibration_tokens(stories.tokenizer, TEXT, 8, 64)


def linear_hessians(model, tokens) -> dict[str, torch.Tensor]:
    """{path: mean x xᵀ} of every linear's input, from plain forward hooks (independent of HessianCapture)."""
    xs, hooks = {}, []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, p=path: xs.setdefault(p, []).append(a[0])))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    out = {}
    for p, parts in xs.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in parts]).double()
        out[p] = (x.T @ x / len(x)).float()
    return out


def test_gptq_beats_rtn_on_every_stories260k_layer(stories, calib):
    hessians = linear_hessians(stories, calib)
    assert len(hessians) == 5 * 7 + 1  # q, k, v, o, gate, up, down per layer + the LM head
    for path, H in hessians.items():
        w = stories.get_submodule(path).weight
        gs = 32 if w.shape[1] % 32 == 0 else w.shape[1]  # down_proj has 172 inputs: one group per row
        _, _, wq = gptq_weight(w, H, bits=4, group_size=gs)
        e_gptq, e_rtn = reconstruction_error(w, wq, H), reconstruction_error(w, rtn_weight(w, 4, gs), H)
        assert e_gptq < e_rtn, (path, e_gptq, e_rtn)


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    N, K, n = 64, 256, 2048
    mix = torch.randn(K, K) / K**0.5 + torch.eye(K)  # correlated features
    x = torch.randn(n, K) @ mix * torch.linspace(0.1, 3, K)  # and unequal scales
    H, w = x.T @ x / n, torch.randn(N, K)
    codes, grid, wq = gptq_weight(w, H, bits=bits, group_size=64, act_order=act_order)
    e_gptq, e_rtn = reconstruction_error(w, wq, H), reconstruction_error(w, rtn_weight(w, bits, 64), H)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # the runtime module multiplies by exactly the weights GPTQ chose
    assert torch.equal(to_kernel_module(codes, grid, None).dequantize(), wq)


def test_hessian_capture_skips_prefix_positions():
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 10, 16)
    for skip in (0, 4):
        cap = HessianCapture(lin, skip)
        assert torch.equal(cap(x), lin(x))  # forwards unchanged
        rows = x[:, skip:].reshape(-1, 16).double()
        torch.testing.assert_close(cap.hessian(), (rows.T @ rows / len(rows)).float())


def test_pgptq_with_skip_0_equals_gptq(calib):
    pred = lambda p, m: is_default_target(p, m) and can_quantize(m, "int4", 32)  # noqa: E731 (stories' MLP is 172 wide)
    kwargs = dict(bits=4, group_size=32, predicate=pred, progress=False)
    a = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, **kwargs)
    b = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, prefix_skip=0, **kwargs)
    c = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, prefix_skip=4, **kwargs)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the skip does change H
    assert a.config.quantization["method"] == "gptq" and c.config.quantization["method"] == "p-gptq"
    assert len(a.config.quantization["modules"]) == 5 * 4 + 2  # attention linears, LM head, tied embedding


def test_true_sequential_groups_and_hessians(stories, calib):
    """True-sequential GPTQ: a layer's targets group by shared input in call order; the first group
    (q/k/v of layer 0) sees the same H either way, the next (o_proj) sees the quantized attention."""
    layer = stories.layers[0]
    targets = {p: m for p, m in stories.named_modules() if isinstance(m, nn.Linear) and p.startswith("model.layers.0.")}
    with torch.no_grad():
        caps = capture_hessians(stories, layer, layer_inputs(stories, as_batches(calib, 8)), targets, {})
    names = [[p.rsplit(".", 1)[-1] for p in g] for g in input_groups(caps)]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    pred = lambda p, m: is_default_target(p, m) and can_quantize(m, "int8")  # noqa: E731
    kw = dict(bits=8, predicate=pred, progress=False)
    a = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, **kw).state_dict()
    b = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, true_sequential=True, **kw).state_dict()
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(a[f"model.layers.0.self_attn.{name}.qweight"], b[f"model.layers.0.self_attn.{name}.qweight"])
    for name in ("self_attn.o_proj", "mlp.gate_proj"):  # down_proj (172 inputs) stays fp32 here
        assert not torch.equal(a[f"model.layers.0.{name}.qweight"], b[f"model.layers.0.{name}.qweight"])


def test_int8_layers_mix(calib):
    """--int8-layers: those decoder layers get int8 per channel, the rest the requested int4."""
    from edgelm.quant.linear import Int4Linear, Int8Linear

    pred = lambda p, m: is_default_target(p, m) and can_quantize(m, "int4", 32)  # noqa: E731
    model = load(STORIES, dtype=torch.float32, fuse=False)
    gptq_quantize(model, calib, bits=4, group_size=32, predicate=pred, int8_layers=(1, 4), progress=False)
    for i, layer in enumerate(model.layers):
        kind = Int8Linear if i in (1, 4) else Int4Linear
        assert all(type(getattr(layer.self_attn, n)) is kind for n in ("q_proj", "k_proj", "v_proj", "o_proj")), i
    assert model.config.quantization["modules"]["model.layers.1.self_attn.q_proj"] == {"bits": 8}
    with pytest.raises(ValueError, match="out of range"):
        gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, bits=4, group_size=32, predicate=pred,
                      int8_layers=(5,), progress=False)


def test_gptq_model_is_close_to_fp(stories, calib):
    pred = lambda p, m: is_default_target(p, m) and can_quantize(m, "int8")  # noqa: E731
    model = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, bits=8, predicate=pred, progress=False)
    x = calib[:2]
    ref, out = stories(x), model(x)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_bad_input_errors(stories, calib):
    with pytest.raises(ValueError, match="fewer than --samples"):
        calibration_tokens(stories.tokenizer, TEXT, 100_000, 512)
    with pytest.raises(ValueError, match="gate_proj: int4 needs out_features divisible by 16, got 172"):
        gptq_quantize(stories, calib, bits=4, group_size=32, progress=False)
    down = lambda p, m: p.endswith("down_proj")  # noqa: E731
    with pytest.raises(ValueError, match="down_proj: int4 group_size 32 does not divide in_features 172"):
        gptq_quantize(stories, calib, bits=4, group_size=32, predicate=down, progress=False)
    with pytest.raises(ValueError, match="divisible by 8"):
        gptq_quantize(stories, calib, bits=8, progress=False)
    with pytest.raises(ValueError, match="3-bit weights are not supported"):
        gptq_weight(torch.randn(16, 32), torch.eye(32), bits=3)
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize"):
        gptq_quantize(stories, calib, predicate=lambda p, m: False, progress=False)
    args = argparse.Namespace(method="p-gptq", calib=TEXT, samples=2, seq_len=8, prefix_skip=8, bits=4,
                              group_size=32, act_order=False)
    with pytest.raises(ValueError, match="leaves no position"):
        gptq_quantize_from_args(stories, args)


def test_driver_hessians_equal_hook_hessians_on_every_layer(stories, calib):
    """The driver's shared x xᵀ cache must not hand gate/up the product of q/k/v's input: a freed
    input_layernorm output's buffer is reused by post_attention_layernorm (it once was, in layers 1
    and 3 of stories260K, and in every SmolLM2 layer)."""
    states = layer_inputs(stories, as_batches(calib, 8))
    for layer in stories.layers:
        targets = {p: m for p, m in stories.named_modules()
                   if isinstance(m, nn.Linear) and any(m is mm for mm in layer.modules())}
        xs, hooks = {}, []
        for p, m in targets.items():
            hooks.append(m.register_forward_pre_hook(lambda mod, a, p=p: xs.setdefault(p, []).append(a[0])))
        with torch.no_grad():
            for h, ctx in states:
                layer(h, None, ctx)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            caps = capture_hessians(stories, layer, states, targets, {})
        assert all(stories.get_submodule(p) is m for p, m in targets.items())  # wrappers removed
        for p, cap in caps.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[p]]).double()
            torch.testing.assert_close(cap.hessian(), (x.T @ x / len(x)).float(), msg=p)
        with torch.no_grad():
            states = [(layer(h, None, ctx), ctx) for h, ctx in states]


def test_hessian_capture_prefix_weight():
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 10, 16).double().float()
    cap = HessianCapture(lin, 4, prefix_weight=0.25)
    cap(x)
    pre, rest = x[:, :4].reshape(-1, 16).double(), x[:, 4:].reshape(-1, 16).double()
    want = (rest.T @ rest + 0.25 * pre.T @ pre) / (len(rest) + 0.25 * len(pre))
    torch.testing.assert_close(cap.hessian(), want.float())
    full = HessianCapture(lin, 0)
    full(x)
    one = HessianCapture(lin, 4, prefix_weight=1.0)
    one(x)
    torch.testing.assert_close(one.hessian(), full.hessian())  # weight 1: plain GPTQ's H
    # prefix_spike: the prefix is left out only where its peak is > spike x the rest's peak
    spiky = x.clone()
    spiky[:, 0] *= 100
    for data, spike, left_out in ((x, 10.0, False), (spiky, 10.0, True), (x, 0.5, True)):
        cap = HessianCapture(lin, 4, prefix_spike=spike)
        cap(data)
        ref = HessianCapture(lin, 4 if left_out else 0)
        ref(data)
        torch.testing.assert_close(cap.hessian(), ref.hessian())


def test_mse_group_params_never_worse_than_min_max():
    w = torch.randn(32, 64) * torch.linspace(0.5, 2, 64)
    w[:, 3] = 8  # an outlier column: clipping it pays off for no row, the search must keep p = 1 there
    wt = torch.rand(64) + 0.1
    for sym in (False, True):
        from edgelm.quant.primitives import int4_codes, int4_group_params, int4_values

        def err(s, z):
            return ((int4_values(int4_codes(w, s[:, None], z[:, None]), s[:, None], z[:, None]) - w) ** 2 * wt).sum(1)

        e_mse, e_minmax = err(*mse_group_params(w, sym, wt)), err(*int4_group_params(w, sym))
        assert (e_mse <= e_minmax).all() and e_mse.sum() < e_minmax.sum(), sym


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_mse_beats_rtn(act_order):
    N, K, n = 64, 256, 2048
    x = torch.randn(n, K) @ (torch.randn(K, K) / K**0.5 + torch.eye(K)) * torch.linspace(0.1, 3, K)
    H, w = x.T @ x / n, torch.randn(N, K)
    codes, grid, wq = gptq_weight(w, H, bits=4, group_size=64, act_order=act_order, mse=True)
    e_rtn = reconstruction_error(w, rtn_weight(w, 4, 64), H)
    assert reconstruction_error(w, wq, H) < 0.8 * e_rtn
    assert reconstruction_error(w, rtn_weight(w, 4, 64, mse=True), H) < e_rtn  # the clip search alone helps RTN
    assert torch.equal(to_kernel_module(codes, grid, None).dequantize(), wq)


def test_head_options(calib):
    """--head-bits 8: an int8 LM head (the tied embedding reads it); --head-gptq: GPTQ on the final
    normed states, its output closer to fp than the round-to-nearest head; prefix_weight without
    a skip changes nothing."""
    from edgelm.quant.linear import Int4Linear, Int8Linear, QuantizedEmbedding

    pred = lambda p, m: is_default_target(p, m) and can_quantize(m, "int4", 32)  # noqa: E731
    kw = dict(bits=4, group_size=32, predicate=pred, progress=False)
    fp = load(STORIES, dtype=torch.float32, fuse=False)
    rtn = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, **kw)
    h8 = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, head_bits=8, **kw)
    hg = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, head_gptq=True, **kw)
    pw = gptq_quantize(load(STORIES, dtype=torch.float32, fuse=False), calib, prefix_weight=0.5, **kw)
    assert isinstance(h8.lm_head, Int8Linear) and isinstance(hg.lm_head, Int4Linear)
    assert isinstance(h8.model.embed_tokens, QuantizedEmbedding) and h8.model.embed_tokens.source is h8.lm_head
    assert all(torch.equal(a, b) for a, b in zip(rtn.state_dict().values(), pw.state_dict().values()))
    # the layers are identical: only the head differs
    layers = [k for k in rtn.state_dict() if ".layers." in k]
    assert all(torch.equal(rtn.state_dict()[k], hg.state_dict()[k]) for k in layers)
    with torch.no_grad():
        x = calib[:2]
        ref = fp(x)
        e_rtn, e_gptq = ((rtn(x) - ref) ** 2).mean(), ((hg(x) - ref) ** 2).mean()
    assert e_gptq < e_rtn, (e_gptq, e_rtn)
