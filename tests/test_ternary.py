"""Ternary BitCPM (edgelm/quant/ternary.py, quant/qat.py): three values per group, the packed LUT
matmul and the dense decode agree with unpack-then-matmul, the STE passes gradients through, a
ternary QAT run on stories260K lowers the loss below the post-ternarization loss, and a saved
ternary checkpoint reloads as BitLinear with the same logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgelm import kernels
from edgelm.loader import load
from edgelm.quant.qat import QATConfig, eval_loss, finish_qat, prepare_qat, random_batches, train_qat
from edgelm.quant.ternary import (
    BitLinear,
    decode_ternary,
    fake_ternary,
    is_ternary_target,
    lut_matmul,
    pack_ternary,
    pack_ternary_tiles,
    scales_to_tiles,
    ternarize_model,
    ternary_params,
    ternary_values,
    tiles_to_scales,
    unpack_ternary,
    unpack_ternary_tiles,
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
    b = BitLinear.from_float(lin, 32)
    plain = BitLinear.from_ternary(b.codes(), b.group_scales(), 32, lin.bias, layout="plain")
    x = torch.randn(rows, 192)
    ref = F.linear(x, ternary_values(unpack_ternary(plain.packed), plain.packed_scales, 32), b.bias)  # unpack, matmul
    torch.testing.assert_close(lut_matmul(x, plain.packed, plain.packed_scales, 32) + b.bias, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-5)  # whichever path forward picks
    assert torch.equal(decode_ternary(plain.packed, plain.packed_scales, 32), plain.dequantize())
    assert torch.equal(plain.dequantize_rows(torch.tensor([3, 0, 79])), plain.dequantize()[[3, 0, 79]])
    # the default layout (the C++ tile kernel where it is built): int16 activations, ~1e-5 relative
    torch.testing.assert_close(b(x), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(b.dequantize(), plain.dequantize())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_tile_layout_roundtrip(group_size):
    t = torch.randint(-1, 2, (24, 256), dtype=torch.int8)
    s = torch.rand(24, 256 // group_size).to(torch.float16)
    assert torch.equal(unpack_ternary_tiles(pack_ternary_tiles(t)), t)
    assert torch.equal(tiles_to_scales(scales_to_tiles(s, group_size), group_size), s)
    b = BitLinear.from_ternary(t, s, group_size, layout="tiles")
    assert b.packed.shape == (24, 64) and b.packed_scales.shape == (24, 8)  # 2 bits + one fp16 per 32
    assert torch.equal(b.codes(), t) and torch.equal(b.group_scales(), s)


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="edgelm's C++ kernels are not built")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13, 40])
@pytest.mark.parametrize("group_size", [32, 64])
def test_tile_kernel_equals_reference(rows, group_size):
    """The C++ ternary kernel (int16 activations per 32-block) against unpack-then-matmul; its
    dequantize is bit-identical to the reference, and so is every row lookup."""
    torch.manual_seed(rows)
    lin = nn.Linear(256, 72, bias=True)
    b = BitLinear.from_float(lin, group_size)
    assert b.layout == "tiles"
    x = torch.randn(rows, 256) * torch.logspace(-2, 1, 256)  # blocks of very different magnitudes
    ref = F.linear(x, b.dequantize(), b.bias)
    y = kernels.ext().linear(b.kernel_handle(), x)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    torch.testing.assert_close(b(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())  # kernel or dense path
    assert torch.equal(kernels.ext().dequantize(b.kernel_handle()), b.dequantize())
    rows_ = torch.tensor([0, 71, 8, 35])
    assert torch.equal(b.lookup_rows(rows_), b.dequantize()[rows_])
    assert torch.equal(b.dequantize_rows(rows_), b.dequantize()[rows_])  # the torch reference, tile by tile


@needs_kernels
@torch.inference_mode()
def test_ternary_model_decodes_in_one_call_like_the_module_path(tmp_path):
    """stories260K with ternary attention (its 172-row MLP does not fit 8-row tiles), saved and
    reloaded: q/k/v fuse into one tiled BitLinear, the whole-model C++ decode step runs it, and its
    logits match the module path's and the in-memory model's."""
    from edgelm.convert import save_quantized
    from edgelm.kernels import llama as fast

    def attention(path, module):
        return ".self_attn." in path

    model = ternarize_model(load(STORIES, dtype=torch.float32, fuse=False), 32, attention, head=None)
    save_quantized(model, tmp_path / "tern")
    again = load(tmp_path / "tern", dtype=torch.float32)
    qkv = again.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, BitLinear) and qkv.layout == "tiles" and qkv.out_features == 128
    prompt = torch.tensor([[1, 403, 407, 261, 378, 9]])
    ref = model(prompt)
    assert (again(prompt) - ref).abs().max() < 1e-4 * ref.abs().max()  # int16 activations either way
    caches = [again.make_cache(), again.make_cache()]
    again.fast_decode = False
    for c in caches:
        again(prompt, c)
    for t in [7, 11, 13]:
        tokens = torch.tensor([[t]])
        again.fast_decode = False
        ref = again(tokens, caches[0])
        again.fast_decode = True
        assert fast.build(again) is not None  # the one-call step takes BitLinear
        out = again(tokens, caches[1])
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


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
    assert isinstance(again.model.layers[0].mlp.gate_up_proj, BitLinear)  # fused on load, plain layout (172 rows)
    x = held[0][:2, :32]
    torch.testing.assert_close(again(x), model(x))


def test_ternarize_model_head_int8_layout():
    model = ternarize_model(load(STORIES, dtype=torch.float32, fuse=False), 32, fits)
    q = model.config.quantization
    assert q["method"] == "ternary" and q["modules"]["lm_head"] == {"bits": 8}
    assert q["modules"]["model.layers.4.self_attn.q_proj"] == {"bits": 2, "ternary": True, "group_size": 32}


def test_quantize_cli_ternary_round_trip(tmp_path, capsys):
    """`edgelm quantize --method ternary`: decoder linears ternary where the group fits (stories'
    172-input down_proj stays dense, with a note), int8 head; `load` runs it with the same logits."""
    from edgelm.cli import main

    out = tmp_path / "tern"
    assert main(["quantize", "--model", STORIES, "--method", "ternary", "--out", str(out), "--threads", "1"]) == 0
    assert "5 layers kept dense" in capsys.readouterr().err
    again = load(out, dtype=torch.float32, fuse=False)
    expected = ternarize_model(load(STORIES, dtype=torch.float32, fuse=False), 32, fits)
    kinds = {p: type(m).__name__ for p, m in expected.named_modules()}
    assert {p: type(m).__name__ for p, m in again.named_modules()} == kinds
    assert type(again.model.layers[0].mlp.down_proj) is nn.Linear
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        assert torch.equal(again(ids), expected(ids))


def test_qat_cli_writes_a_loadable_checkpoint(tmp_path):
    """`edgelm qat --ternary` end to end on stories260K (group 4: its down_proj has 172 inputs): a
    folder `load` runs with BitLinear, the run's history, and latent checkpoints with their settings."""
    import json

    from edgelm.cli import main

    out = tmp_path / "qat"
    args = ["qat", "--model", STORIES, "--ternary", "--text", TEXT, "--steps", "4", "--warmup", "1", "--batch-size", "2",
            "--seq-len", "32", "--group-size", "4", "--distill", "--ckpt-every", "2", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    info = json.loads((out / "qat.json").read_text())
    assert len(info["history"]) == 4 and info["tokens"] == 4 * 2 * 32
    assert sorted(p.name for p in (out / "latent").iterdir()) == ["qat-args.json", "step2.safetensors", "step4.safetensors"]
    assert json.loads((out / "latent" / "qat-args.json").read_text())["seq_len"] == 32
    model = load(out, dtype=torch.float32, fuse=False)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, BitLinear) and down.group_size == 4 and down.layout == "plain"
    assert set(down.codes().unique().tolist()) <= {-1, 0, 1}


def test_bad_input_errors():
    model = load(STORIES, dtype=torch.float32, fuse=False)
    with pytest.raises(ValueError, match="must be a multiple of 4 dividing in_features 172"):
        ternarize_model(model)  # down_proj
    with pytest.raises(ValueError, match="no nn.Linear layer to ternarize"):
        ternarize_model(model, predicate=lambda p, m: False)
    with pytest.raises(ValueError, match="--lr must be > 0"):
        QATConfig(lr=0).check()
