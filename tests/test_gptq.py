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
    calibration_tokens,
    gptq_quantize,
    gptq_quantize_from_args,
    gptq_weight,
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
