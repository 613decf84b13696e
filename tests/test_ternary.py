"""Ternary BitCPM (edgelm/quant/ternary.py, quant/qat.py): three values per group, the packed LUT
matmul and the dense decode agree with unpack-then-matmul, the STE passes gradients through, a
ternary QAT run on stories260K lowers the loss below the post-ternarization loss, and a saved
ternary checkpoint reloads as BitLinear with the same logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgelm.loader import load
from edgelm.quant.qat import QATConfig, eval_loss, finish_qat, prepare_qat, random_batches, train_qat
from edgelm.quant.ternary import (
    BitLinear,
    decode_ternary,
    fake_ternary,
    is_ternary_target,
    lut_matmul,
    pack_ternary,
    ternarize_model,
    ternary_params,
    ternary_values,
    unpack_ternary,
)

torch.set_num_threads(1)
STORIES = "/work/shared/models/stories260K/hf"
TEXT = "/work/shared/data/python-library-docs.txt"


def fits(path, m) -> bool:  # stories260K's down_proj has 172 inputs: no group of 32 divides it
    return is_ternary_target(path, m) and m.in_features % 32 == 0


def test_three_values_per_group_on_real_weights():
    model = load(STORIES, dtype=torch.float32, fuse=False)
    w = model.model.layers[2].mlp.gate_proj.weight  # (172, 64)
    t, s = ternary_params(w, 32)
    assert set(t.unique().tolist()) == {-1, 0, 1}
    values = ternary_values(t, s, 32).reshape(172, 2, 32)
    for n in range(172):
        for g in range(2):
            assert set(values[n, g].tolist()) <= {-float(s[n, g]), 0.0, float(s[n, g])}
    torch.testing.assert_close(s, w.reshape(172, 2, 32).abs().mean(-1))  # absmean scale


def test_pack_roundtrip_and_two_bits_per_weight():
    t = torch.randint(-1, 2, (48, 128), dtype=torch.int8)
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 32)
    assert torch.equal(unpack_ternary(packed), t)


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_packed_matmul_equals_reference(rows):
    lin = nn.Linear(192, 80, bias=True)
    b = BitLinear.from_float(lin)
    x = torch.randn(rows, 192)
    ref = F.linear(x, ternary_values(unpack_ternary(b.qweight), b.scales, 32), b.bias)  # unpack, then matmul
    torch.testing.assert_close(lut_matmul(x, b.qweight, b.scales, 32) + b.bias, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b(x), ref, rtol=1e-5, atol=1e-5)  # whichever path forward picks
    assert torch.equal(decode_ternary(b.qweight, b.scales, 32), b.dequantize())


def test_ste_gradient_is_identity():
    w = torch.randn(8, 64, requires_grad=True)
    fake_ternary(w).mul(torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(8, 64))


def test_qat_lowers_loss_below_post_ternarization(tmp_path):
    model = load(STORIES, dtype=torch.float32, fuse=False)
    ids = torch.as_tensor(model.tokenizer.encode(open(TEXT).read()[:60_000]))
    held = [next(random_batches(ids, QATConfig(batch_size=8, seq_len=64, seed=123)))]
    params = prepare_qat(model, 32, fits)
    assert len(params) == 5 * 6  # q, k, v, o, gate, up in 5 layers
    before = eval_loss(model, held)  # right after ternarization
    cfg = QATConfig(steps=30, lr=3e-3, warmup=3, batch_size=8, seq_len=64)
    history = train_qat(model, params, random_batches(ids, cfg), cfg, progress=False)
    after = eval_loss(model, held)
    assert after < before - 0.1, (before, after, history[-1])
    # the packed model runs the trained weights, and reloads from disk as BitLinear
    finish_qat(model, 32, head=None)
    assert abs(eval_loss(model, held) - after) < 0.02  # fp16 scales
    from edgelm.convert import save_quantized

    save_quantized(model, tmp_path / "tern")
    again = load(tmp_path / "tern", dtype=torch.float32)
    assert isinstance(again.model.layers[0].mlp.up_proj, BitLinear)
    x = held[0][:2, :32]
    torch.testing.assert_close(again(x), model(x))


def test_ternarize_model_head_int8_layout():
    model = ternarize_model(load(STORIES, dtype=torch.float32, fuse=False), 32, fits)
    q = model.config.quantization
    assert q["method"] == "ternary" and q["modules"]["lm_head"] == {"bits": 8}
    assert q["modules"]["model.layers.4.self_attn.q_proj"] == {"bits": 2, "ternary": True, "group_size": 32}


def test_bad_input_errors():
    model = load(STORIES, dtype=torch.float32, fuse=False)
    with pytest.raises(ValueError, match="must be a multiple of 4 dividing in_features 172"):
        ternarize_model(model)  # down_proj
    with pytest.raises(ValueError, match="no nn.Linear layer to ternarize"):
        ternarize_model(model, predicate=lambda p, m: False)
    with pytest.raises(ValueError, match="--lr must be > 0"):
        QATConfig(lr=0).check()
