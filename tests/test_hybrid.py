"""Granite 4.0-H (Mamba-2 + attention + MoE, NoPE), Mamba-2 and Granite MoE, on tiny random configs:

- parity with transformers (prefill, and token-by-token decode with the cache), fp32, <= 1e-4;
- the SSD chunked scan == the token-by-token recurrence, for any chunk size;
- a left-padded batch == each prompt alone; snapshot/restore replays generation exactly;
- Hugging Face folder and GGUF (written here the way llama.cpp's converter writes it) load to the
  transformers logits; token-grouped MoE == the per-token loop; bad configs fail clearly;
- int8 / int4 MoE experts (QuantizedExperts) == the per-token loop over their dequantized weights,
  quantized MoE models stay close to fp32 and save -> load to identical logits.
"""

import copy
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import edgelm
from edgelm import kernels
from edgelm.cache import KVCache, MambaCache
from edgelm.convert import export_hf, save_quantized
from edgelm.layers.mamba2 import Mamba2Mixer, mamba2_scan_reference, ssd_chunked_scan
from edgelm.layers.moe import ExpertWeights, grouped_experts, moe_reference
from edgelm.loader import assign_weights
from edgelm.models import build_model, get_model_module
from edgelm.quant.linear import Int4Linear, Int8Linear, QuantizedExperts
from edgelm.quant.quantize import quantize_decoder

transformers.logging.set_verbosity_error()

VOCAB = 512  # the stories260K tokenizer's, so the round-trip folders carry a real tokenizer
ATOL = 1e-4
STORIES_HF = Path("/work/shared/models/stories260K/hf")

HYBRID = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "layer_types": ["mamba", "attention", "mamba", "mamba"],
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_n_groups": 2,
    "mamba_chunk_size": 16,
    "num_local_experts": 6,
    "num_experts_per_tok": 2,
    "shared_intermediate_size": 48,
    "embedding_multiplier": 6.0,
    "residual_multiplier": 0.3,
    "attention_multiplier": 0.05,
    "logits_scaling": 3.0,
    "position_embedding_type": "nope",
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
MAMBA2 = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_heads": 8,
    "head_dim": 16,
    "state_size": 16,
    "n_groups": 2,
    "chunk_size": 16,
    "tie_word_embeddings": True,
}
GRANITEMOE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 6,
    "num_experts_per_tok": 2,
    "embedding_multiplier": 6.0,
    "residual_multiplier": 0.3,
    "attention_multiplier": 0.05,
    "logits_scaling": 3.0,
}
# name -> (model_type, config)
CASES = {
    "hybrid-moe": ("granitemoehybrid", HYBRID),
    "hybrid-dense-tied": (
        "granitemoehybrid",
        dict(
            HYBRID,
            num_local_experts=0,
            layer_types=["attention", "mamba", "mamba", "attention"],
            tie_word_embeddings=True,
            mamba_n_groups=1,
        ),
    ),
    "hybrid-rope-bias": (
        "granitemoehybrid",
        dict(HYBRID, position_embedding_type="rope", mamba_proj_bias=True, attention_bias=True),
    ),
    "mamba2": ("mamba2", MAMBA2),
    # dt clamped in the scan (prefill) but not in the single-token step, as transformers does
    "mamba2-dt-limit": ("mamba2", dict(MAMBA2, time_step_limit=(0.0, 0.3), n_groups=1)),
    "granitemoe": ("granitemoe", GRANITEMOE),
    "granitemoeshared": ("granitemoeshared", dict(GRANITEMOE, shared_intermediate_size=48)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(model: torch.nn.Module) -> None:
    """Every weight random, the SSM ones in their working ranges (decay per step 0.2..0.99)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("A_log"):
                p.uniform_(-1.0, 1.0)
            elif name.endswith("dt_bias"):
                p.uniform_(-2.0, 0.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            elif "conv1d" in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)


@functools.cache
def models(name: str):
    """(transformers reference, edgelm model) sharing one set of random weights."""
    model_type, cfg = CASES[name]
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    randomize_(ref)
    config = hf_config.to_dict()
    with torch.device("meta"):
        model = build_model(config)
    weights = get_model_module(model_type).sanitize(dict(ref.state_dict()), config)
    assign_weights(model, weights, torch.float32)
    return ref, model.eval()


def tokens_for(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(a, b, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def run_chunks(model, tokens, sizes, cache=None) -> torch.Tensor:
    cache = model.make_cache() if cache is None else cache
    out, i = [], 0
    for n in sizes:
        out.append(model(tokens[:, i : i + n], cache))
        i += n
    assert i == tokens.shape[1]
    return torch.cat(out, dim=1)


def hf_chunks(ref, tokens, sizes) -> torch.Tensor:
    cache, out, i = transformers.DynamicCache(config=ref.config), [], 0
    kw = "cache_params" if ref.config.model_type == "mamba2" else "past_key_values"
    for n in sizes:
        out.append(ref(tokens[:, i : i + n], use_cache=True, **{kw: cache}).logits)
        i += n
    return torch.cat(out, dim=1)


# --- parity with transformers ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_matches_transformers_prefill_and_decode(name):
    ref, model = models(name)
    tokens = tokens_for(2, 40)  # 40: three scan chunks of 16, the last one partial
    expected = ref(tokens).logits
    assert expected.abs().max() > 0.5
    close(model(tokens), expected)
    sizes = [20] + [1] * 20  # prefill, then the single-token recurrent step
    close(run_chunks(model, tokens, sizes), hf_chunks(ref, tokens, sizes))


@pytest.mark.parametrize("name", ["hybrid-moe", "hybrid-dense-tied", "hybrid-rope-bias", "mamba2", "mamba2-dt-limit"])
@torch.no_grad()
def test_fast_mamba_step_matches_module_path(name):
    """The C++ decode step (conv step, recurrence, D skip, gated norm in one call) against the
    module path it replaces, on two rows for 12 tokens after a prefill."""
    _, model = models(name)
    mixers = [m for m in model.modules() if isinstance(m, Mamba2Mixer)]
    assert mixers and kernels.available()
    tokens = tokens_for(2, 32)
    sizes = [20] + [1] * 12
    fast = run_chunks(model, tokens, sizes)
    for m in mixers:  # the module path, the reference
        m.fast = False
    try:
        slow = run_chunks(model, tokens, sizes)
    finally:
        for m in mixers:
            del m.fast
    close(fast, slow, atol=1e-5)
    cache = model.make_cache()
    model(tokens[:, :20], cache)
    mamba = next(c for c in cache if isinstance(c, MambaCache))
    before = mamba.snapshot()
    model(tokens[:, 20:21], cache)
    assert mamba.ssm_state is not before[2] and mamba.conv_state is not before[1]  # new tensors: snapshots stay valid
    out = mixers[0].fast_step(torch.zeros(2, 1, mixers[0].in_proj.in_features), mamba, None)
    assert out is not None and out.shape == (2, 1, mixers[0].out_proj.out_features)


@torch.no_grad()
def test_cached_chunks_match_uncached():
    _, model = models("hybrid-moe")
    tokens = tokens_for(2, 40)
    close(run_chunks(model, tokens, [7] * 5 + [5]), model(tokens))


@pytest.mark.parametrize("name", ["hybrid-moe", "mamba2"])
@torch.no_grad()
def test_bfloat16_runs_close_to_fp32(name):
    _, model = models(name)
    half = copy.deepcopy(model).to(torch.bfloat16)
    tokens = tokens_for(2, 40)
    cache = half.make_cache()
    got = run_chunks(half, tokens, [20] + [1] * 20, cache)
    assert cache[0].ssm_state.dtype == torch.float32  # the recurrence always accumulates in fp32
    close(got, model(tokens), atol=0.5)


# --- the chunked scan -----------------------------------------------------------------------


def scan_inputs(B=2, L=37, H=6, P=4, G=2, N=5, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, P, generator=g)
    dt = F.softplus(torch.randn(B, L, H, generator=g)) * dt_scale
    A = -torch.rand(H, generator=g) * 2 - 0.1
    Bm, Cm = torch.randn(B, L, G, N, generator=g), torch.randn(B, L, G, N, generator=g)
    h0 = torch.randn(B, H, P, N, generator=g)
    return x, dt, A, Bm, Cm, h0


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
@pytest.mark.parametrize("dt_scale", [1.0, 30.0])  # 30: log-decays of ~-1000 per chunk
def test_chunked_scan_matches_recurrence(chunk, dt_scale):
    x, dt, A, Bm, Cm, h0 = scan_inputs(dt_scale=dt_scale)
    for h in (None, h0):
        y_ref, h_ref = mamba2_scan_reference(x, dt, A, Bm, Cm, h)
        y, h_out = ssd_chunked_scan(x, dt, A, Bm, Cm, chunk, h)
        assert torch.isfinite(y).all()
        close(y, y_ref, atol=1e-4 * dt_scale)
        close(h_out, h_ref, atol=1e-4 * dt_scale)


@torch.no_grad()
def test_mixer_chunk_size_does_not_change_output():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, num_heads=4, head_dim=16, state_size=8, num_groups=2, chunk_size=8)
    randomize_(mixer)
    u = torch.randn(2, 100, 32)  # 100: not a multiple of any chunk size below
    outs = []
    for chunk in (8, 64, 256):
        mixer.chunk_size = chunk
        outs.append(mixer(u, None))
    close(outs[1], outs[0], atol=1e-5)
    close(outs[2], outs[0], atol=1e-5)


# --- batching, snapshot/restore, the cache protocol ------------------------------------------


@pytest.mark.parametrize("name", ["hybrid-moe", "mamba2"])
@pytest.mark.parametrize("prefill", ["one-call", "chunks-of-7"])
@torch.no_grad()
def test_left_padded_batch_matches_singles(name, prefill):
    _, model = models(name)
    lengths, steps = (30, 19), 4
    pad = [max(lengths) - n for n in lengths]
    prompts = [tokens_for(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    filler = tokens_for(1, max(pad), seed=99)[0]  # what padding holds must not matter
    batch = torch.stack([torch.cat([filler[:p], t]) for p, t in zip(pad, prompts)])
    nxt = tokens_for(2, steps, seed=5)
    cache = model.make_cache(left_pad=pad)
    sizes = [max(lengths)] if prefill == "one-call" else [7, 7, 7, 7, 2]
    batched = [run_chunks(model, batch, sizes, cache)[:, -1]]
    batched += [model(nxt[:, i : i + 1], cache)[:, -1] for i in range(steps)]
    for row, prompt in enumerate(prompts):
        single_cache = model.make_cache()
        alone = [model(prompt[None], single_cache)[:, -1]]
        alone += [model(nxt[row : row + 1, i : i + 1], single_cache)[:, -1] for i in range(steps)]
        for got, want in zip(batched, alone):
            close(got[row], want[0])


def greedy(model, cache, first: torch.Tensor, n: int) -> list[int]:
    out, tok = [], first
    for _ in range(n):
        tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(int(tok))
    return out


@pytest.mark.parametrize("name", ["hybrid-moe", "mamba2"])
@torch.no_grad()
def test_snapshot_generate_restore_reproduces_tokens(name):
    _, model = models(name)
    cache = model.make_cache()
    prompt = tokens_for(1, 23)
    model(prompt[:, :-1], cache)
    snap = [c.snapshot() for c in cache]
    first = greedy(model, cache, prompt[:, -1:], 8)
    for c, s in zip(cache, snap):
        c.restore(s)
    assert greedy(model, cache, prompt[:, -1:], 8) == first
    fresh = model.make_cache()  # and both equal a run that never rolled back
    model(prompt[:, :-1], fresh)
    assert greedy(model, fresh, prompt[:, -1:], 8) == first


@torch.no_grad()
def test_mamba_cache_protocol_and_memory_report():
    _, model = models("hybrid-moe")
    cache = model.make_cache()
    assert [type(c) for c in cache] == [MambaCache, KVCache, MambaCache, MambaCache]
    model(tokens_for(1, 10), cache)
    mamba = cache[0]
    assert mamba.offset == 10 and mamba.trim(0) == 0
    with pytest.raises(ValueError, match="snapshot"):
        mamba.trim(1)
    state_bytes = sum(c.nbytes for c in cache if isinstance(c, MambaCache))
    assert state_bytes == model.state_bytes_per_sequence() > 0
    # 8 heads x 16 x 16 state (fp32) + conv (64·2 + 2·2·16 channels x 3 past inputs), x 3 layers
    assert state_bytes == 3 * (8 * 16 * 16 * 4 + (128 + 64) * 3 * 4)
    assert model.kv_bytes_per_token() == 2 * 2 * 16 * 4  # the one attention layer: K and V
    model(tokens_for(1, 50), cache)
    assert sum(c.nbytes for c in cache if isinstance(c, MambaCache)) == state_bytes  # fixed size


@torch.no_grad()
def test_inspect_and_bench_memory_report():
    """`edgelm inspect` predicts, and `edgelm bench --context --batch` measures, the same bytes:
    KV for the one attention layer per token, the Mamba states once per sequence; the dense
    configuration of the same width has 4 attention layers."""
    from edgelm.inspect import analyze
    from edgelm.profiler.bench import cache_memory

    _, model = models("hybrid-moe")
    info = analyze(model, context=512, batch=3)
    per_token, state = 2 * 2 * 16 * 4, model.state_bytes_per_sequence()
    assert info["kv_bytes_per_token"] == per_token and info["state_bytes_per_sequence"] == state
    assert info["kv_cache_bytes"] == 3 * 512 * per_token and info["state_cache_bytes"] == 3 * state
    assert info["dense_equivalent_kv_cache_bytes"] == 4 * 3 * 512 * per_token
    assert info["layer_kinds"] == {"mamba": 3, "attention": 1}
    measured = cache_memory(model, 512, 3)  # allocated by real caches after a forward
    assert measured["kv_cache_bytes"] == info["kv_cache_bytes"]
    assert measured["state_cache_bytes"] == info["state_cache_bytes"]
    assert measured["dense_equivalent_cache_bytes"] == info["dense_equivalent_kv_cache_bytes"]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        cache_memory(model, 4096, 1)


def test_cli_bench_memory_from_a_config_alone(tmp_path, capsys):
    """`edgelm bench --model config.json --context N --batch B --repeat 0`: random weights of the
    architecture, the caches' real bytes against the dense configuration of the same width."""
    from edgelm.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(HYBRID, model_type="granitemoehybrid")))
    argv = ["bench", "--model", str(cfg), "--context", "256", "--batch", "2", "--repeat", "0", "--json"]
    assert main(argv + ["--threads", "1"]) == 0
    memory = json.loads(capsys.readouterr().out)["cache_memory"]
    per_token = 2 * 2 * 16 * 4  # one attention layer, 2 KV heads of 16, fp32
    assert memory["kv_cache_bytes"] == 2 * 256 * per_token
    assert memory["dense_equivalent_cache_bytes"] == 4 * memory["kv_cache_bytes"]
    assert memory["state_cache_bytes"] == 2 * 3 * (8 * 16 * 16 * 4 + (128 + 64) * 3 * 4)
    assert main(["bench", "--model", str(cfg), "--repeat", "0"]) == 2  # nothing to measure


# --- loading: Hugging Face folder and GGUF ----------------------------------------------------


def save_hf_folder(ref, folder: Path) -> Path:
    ref.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_HF / name, folder / name)
    return folder


@pytest.mark.parametrize("name", ["hybrid-moe", "mamba2", "granitemoe"])
@torch.no_grad()
def test_hf_folder_round_trip(name, tmp_path):
    ref, model = models(name)
    folder = save_hf_folder(ref, tmp_path / name)
    loaded = edgelm.load(folder, dtype=torch.float32)
    tokens = tokens_for(2, 24)
    close(loaded(tokens), ref(tokens).logits)
    close(loaded(tokens), model(tokens), atol=1e-5)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter: half-split RoPE rows -> interleaved pairs (LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_tensors(ref, config: dict, kinds: list[str]) -> dict[str, torch.Tensor]:
    """The HF state dict under llama.cpp's names and layouts (convert_hf_to_gguf.py)."""
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    prefix = "backbone." if "backbone.embeddings.weight" in sd else "model."
    out = {
        "token_embd.weight": sd[
            f"{prefix}embeddings.weight" if prefix == "backbone." else "model.embed_tokens.weight"
        ]
    }
    out["output_norm.weight"] = sd[f"{prefix}norm_f.weight" if prefix == "backbone." else "model.norm.weight"]
    if not config.get("tie_word_embeddings"):
        out["output.weight"] = sd["lm_head.weight"]
    moe = config.get("num_local_experts", 0) > 0
    for i, kind in enumerate(kinds):
        p, b = f"{prefix}layers.{i}.", f"blk.{i}."
        if prefix == "backbone.":
            out[b + "attn_norm.weight"] = sd[p + "norm.weight"]
        else:
            out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
            out[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if kind == "mamba":
            mx = p + ("mixer." if prefix == "backbone." else "mamba.")
            G = config.get("n_groups", config.get("mamba_n_groups"))
            out[b + "ssm_in.weight"] = sd[mx + "in_proj.weight"]
            out[b + "ssm_conv1d.weight"] = sd[mx + "conv1d.weight"].squeeze(1)
            out[b + "ssm_conv1d.bias"] = sd[mx + "conv1d.bias"]
            out[b + "ssm_dt.bias"] = sd[mx + "dt_bias"]
            out[b + "ssm_a"] = -torch.exp(sd[mx + "A_log"]).reshape(-1, 1)
            out[b + "ssm_d"] = sd[mx + "D"].reshape(-1, 1)
            out[b + "ssm_norm.weight"] = sd[mx + "norm.weight"].reshape(G, -1)
            out[b + "ssm_out.weight"] = sd[mx + "out_proj.weight"]
            for bias in ("in_proj.bias", "out_proj.bias"):
                if mx + bias in sd:
                    out[b + ("ssm_in.bias" if bias.startswith("in") else "ssm_out.bias")] = sd[mx + bias]
        else:
            at = p + "self_attn."
            out[b + "attn_q.weight"] = permute_qk(sd[at + "q_proj.weight"], config["num_attention_heads"])
            out[b + "attn_k.weight"] = permute_qk(sd[at + "k_proj.weight"], config["num_key_value_heads"])
            out[b + "attn_v.weight"] = sd[at + "v_proj.weight"]
            out[b + "attn_output.weight"] = sd[at + "o_proj.weight"]
        if prefix == "backbone.":
            continue
        if moe:
            out[b + "ffn_gate_inp.weight"] = sd[p + "block_sparse_moe.router.weight"]
            gate, up = sd[p + "block_sparse_moe.experts.gate_up_proj"].chunk(2, dim=-2)
            out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = gate, up
            out[b + "ffn_down_exps.weight"] = sd[p + "block_sparse_moe.experts.down_proj"]
        if p + "shared_mlp.input_linear.weight" in sd:
            gate, up = sd[p + "shared_mlp.input_linear.weight"].chunk(2, dim=-2)
            sfx = "_shexp" if moe else ""
            out[b + f"ffn_gate{sfx}.weight"], out[b + f"ffn_up{sfx}.weight"] = gate, up
            out[b + f"ffn_down{sfx}.weight"] = sd[p + "shared_mlp.output_linear.weight"]
    return out


def write_gguf(path: Path, arch: str, config: dict, kinds: list[str], tensors: dict) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(len(kinds))
    w.add_embedding_length(config["hidden_size"])
    w.add_vocab_size(config["vocab_size"])
    if arch == "mamba2":
        d_inner = config["num_heads"] * config["head_dim"]
        w.add_context_length(2**20)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_ssm_conv_kernel(config.get("conv_kernel", 4))
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(config["state_size"])
        w.add_ssm_time_step_rank(config["num_heads"])
        w.add_ssm_group_count(config["n_groups"])
        w.add_layer_norm_rms_eps(1e-5)
    else:
        w.add_context_length(config["max_position_embeddings"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(config["num_attention_heads"])
        kv = config["num_key_value_heads"]
        w.add_head_count_kv([kv if k == "attention" else 0 for k in kinds] if arch == "granitehybrid" else kv)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(10000.0)
        w.add_embedding_scale(config["embedding_multiplier"])
        w.add_residual_scale(config["residual_multiplier"])
        w.add_attention_scale(config["attention_multiplier"])
        w.add_logit_scale(config["logits_scaling"])
        w.add_expert_count(config["num_local_experts"])
        w.add_expert_used_count(config["num_experts_per_tok"] if config["num_local_experts"] else 0)
        if config.get("shared_intermediate_size"):
            w.add_expert_shared_feed_forward_length(config["shared_intermediate_size"])
    if arch == "granitehybrid":
        w.add_ssm_conv_kernel(config["mamba_d_conv"])
        w.add_ssm_state_size(config["mamba_d_state"])
        w.add_ssm_group_count(config["mamba_n_groups"])
        w.add_ssm_inner_size(config["mamba_n_heads"] * config["mamba_d_head"])
        w.add_ssm_time_step_rank(config["mamba_n_heads"])
        w.add_rope_scaling_finetuned(config.get("position_embedding_type") == "rope")
    add_stories_vocab(w)
    for name, t in tensors.items():
        w.add_tensor(name, t.float().contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_stories_vocab(w) -> None:
    vocab = json.loads((STORIES_HF / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)  # unk, control, bytes, normal
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


@pytest.mark.parametrize(
    "name, arch",
    [
        ("hybrid-moe", "granitehybrid"),
        ("hybrid-dense-tied", "granitehybrid"),
        ("mamba2", "mamba2"),
        ("granitemoeshared", "granitemoe"),
    ],
)
@torch.no_grad()
def test_gguf_round_trip(name, arch, tmp_path):
    ref, model = models(name)
    config = ref.config.to_dict()
    kinds = model_kinds(model)
    path = write_gguf(tmp_path / f"{name}.gguf", arch, config, kinds, llama_cpp_tensors(ref, config, kinds))
    loaded = edgelm.load(path, dtype=torch.float32)
    assert model_kinds(loaded) == kinds
    tokens = tokens_for(2, 24)
    close(loaded(tokens), ref(tokens).logits)
    close(loaded(tokens), model(tokens), atol=1e-5)


def model_kinds(model) -> list[str]:
    return [getattr(layer, "kind", "attention") for layer in model.layers]


# --- MoE -------------------------------------------------------------------------------------


def test_grouped_experts_match_per_token_loop():
    g = torch.Generator().manual_seed(0)
    T, hidden, I, E, k = 37, 16, 8, 7, 3
    x = torch.randn(T, hidden, generator=g)
    w_in = torch.randn(E, 2 * I, hidden, generator=g) * hidden**-0.5
    w_out = torch.randn(E, hidden, I, generator=g) * I**-0.5
    logits = torch.randn(T, E, generator=g)
    logits[:, 5] = -1e9  # expert 5 gets no token: skipped, not a zero-row matmul
    top, idx = logits.topk(k, dim=-1)
    weights = top.softmax(-1)
    got = grouped_experts(x, weights, idx, w_in, w_out, F.silu)
    expected = moe_reference(x, weights, idx, w_in, w_out, F.silu)
    close(got, expected, atol=1e-5)
    # the modules as MoE passes them: fp32 experts' few rows on the C++ kernel (1 token: decode)
    m_in, m_out = ExpertWeights(E, 2 * I, hidden), ExpertWeights(E, hidden, I)
    m_in.weight.data, m_out.weight.data = w_in, w_out
    with torch.inference_mode():
        close(grouped_experts(x, weights, idx, m_in, m_out, F.silu), expected, atol=1e-5)
        close(grouped_experts(x[:1], weights[:1], idx[:1], m_in, m_out, F.silu), expected[:1], atol=1e-5)
        assert kernels.stacked_linear(m_in, 2, x[:3]) is not None


# quantized experts against moe_reference over their dequantized stacks: edgelm's kernels round
# activations to int16 per 32-block (~1e-5 relative per matmul, two matmuls, outputs of order 1);
# without them torch's kernels take bf16 activations (~3e-3 relative)
QUANT_MOE_ATOL = 3e-4 if kernels.available() else 3e-2


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 5, 64])  # decode (one token, no sort), few rows (int kernel), many (dequantized expert)
@torch.no_grad()
def test_quantized_experts_match_dequantized_reference(method, T, monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden, I, E, k = 64, 32, 5, 2
    x = torch.randn(T, hidden, generator=g)
    w_in = torch.randn(E, 2 * I, hidden, generator=g) * hidden**-0.5
    w_out = torch.randn(E, hidden, I, generator=g) * I**-0.5
    logits = torch.randn(T, E, generator=g)
    logits[:, 3] = -1e9  # expert 3 gets no token
    top, idx = logits.topk(k, dim=-1)
    weights = top.softmax(-1)
    q_in = QuantizedExperts.from_float(w_in, method)
    q_out = QuantizedExperts.from_float(w_out, method)
    kind = Int8Linear if method == "int8" else Int4Linear
    assert q_in.num_experts == E and all(type(m) is kind for m in [*q_in.experts, *q_out.experts])
    expected = moe_reference(x, weights, idx, q_in.dequantize(), q_out.dequantize(), F.silu)
    assert expected.abs().max() > 0.5
    if T == 64:
        assert torch.bincount(idx.reshape(-1)).max() >= Int8Linear.dequant_min_rows  # one expert dequantized
    # the whole stack is never expanded to fp32: only the active experts' own modules run
    monkeypatch.setattr(QuantizedExperts, "dequantize", lambda *a, **kw: pytest.fail("stack dequantized"))
    close(grouped_experts(x, weights, idx, q_in, q_out, F.silu), expected, atol=QUANT_MOE_ATOL)


@functools.cache
def quantized_model(name: str, method: str):
    """The fp32 edgelm model of `name` with its decoder linears and MoE experts quantized (the
    layers the kernels cannot hold, e.g. int4's 6-expert router, stay dense: quantize_decoder)."""
    model = copy.deepcopy(models(name)[1])
    quantize_decoder(model, method)
    return model


# quantized vs fp32 logits of the tiny random models (hidden 64), prefill and token-by-token decode:
# (relative RMS ||q - f|| / ||f||, max |q - f| / max |f|). Measured: int8 <= (0.019, 0.056), int4
# <= (0.14, 0.15); the int8 maximum is a token whose top-k routing flips. Quantizing all but the
# experts measures int8 (0.013, 0.012), int4 (0.13, 0.13): the experts add little.
QUANT_LOGITS_BOUND = {"int8": (0.03, 0.1), "int4": (0.2, 0.25)}


def assert_close_to_fp32(got, expected, method: str) -> None:
    rms_bound, max_bound = QUANT_LOGITS_BOUND[method]
    diff = got - expected
    assert diff.norm() / expected.norm() < rms_bound
    assert diff.abs().max() / expected.abs().max() < max_bound


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("name", ["hybrid-moe", "granitemoe"])
@torch.no_grad()
def test_quantized_moe_model_close_to_fp32(name, method):
    _, fp32 = models(name)
    model = quantized_model(name, method)
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert experts and not any(isinstance(m, ExpertWeights) for m in model.modules())
    moe_layers = [p for p, m in model.named_modules() if p.endswith("block_sparse_moe")]
    layout = model.config.quantization["modules"]
    for path in moe_layers:
        assert layout[f"{path}.input_linear"]["experts"] == len(experts[0].experts)
        assert layout[f"{path}.output_linear"]["bits"] == (8 if method == "int8" else 4)
    assert not any(".experts." in p for p in layout)  # one entry per stack, not per expert
    tokens = tokens_for(2, 24)
    assert_close_to_fp32(model(tokens), fp32(tokens), method)
    one = tokens[:1]  # batch 1: the single-token expert path
    sizes = [8] + [1] * 16
    decoded = run_chunks(model, one, sizes)
    assert_close_to_fp32(decoded, run_chunks(fp32, one, sizes), method)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("name", ["hybrid-moe", "granitemoe"])
@torch.no_grad()
def test_quantized_moe_save_load_round_trip_exact(name, method, tmp_path):
    """What `edgelm quantize` does (quantize_decoder, save_quantized) reloads to the same modules
    and identical logits."""
    model = quantized_model(name, method)
    model.tokenizer = None
    out = save_quantized(model, tmp_path / name)
    for file in ("tokenizer.json", "tokenizer_config.json"):  # load() wants a tokenizer
        shutil.copy(STORIES_HF / file, out / file)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["modules"] == model.config.quantization["modules"]
    loaded = edgelm.load(out, dtype=torch.float32, fuse=False)
    kinds = {p: type(m).__name__ for p, m in model.named_modules()}
    assert {p: type(m).__name__ for p, m in loaded.named_modules()} == kinds
    for p, m in model.named_modules():
        if isinstance(m, (Int8Linear, Int4Linear)):  # codes and scales as quantized (scales stay bf16)
            again = loaded.get_submodule(p)
            assert torch.equal(again.dequantize(), m.dequantize())
    tokens = tokens_for(2, 24)
    assert torch.equal(loaded(tokens), model(tokens))
    # decode: the quantized modules are exact too, but a layer kept dense (int4 cannot hold the
    # Mamba in_proj's 328 rows) runs MKL's one-row GEMV, whose rounding depends on the weight's
    # alignment, and safetensors' tensors sit at any 8-byte offset (seen: 5e-5 after 16 steps)
    one, sizes = tokens[:1], [8] + [1] * 16
    close(run_chunks(loaded, one, sizes), run_chunks(model, one, sizes), atol=1e-4)
    fused = edgelm.load(out, dtype=torch.float32)  # fused q/k/v: same maths, other summation order
    close(fused(tokens), model(tokens), atol=1e-3)


@torch.no_grad()
def test_quantized_moe_exports_dequantized_experts(tmp_path):
    """export_hf turns QuantizedExperts back into stacked fp32 experts transformers reads."""
    model = copy.deepcopy(quantized_model("granitemoe", "int8"))
    model.tokenizer = None
    tokens = tokens_for(2, 24)
    expected = model(tokens)
    export_hf(model, tmp_path / "hf")
    assert not any(isinstance(m, QuantizedExperts) for m in model.modules())
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    close(ref(tokens).logits, expected)  # int16-rounded activations vs the dequantized weights


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, change, match",
    [
        ("granitemoehybrid", {"mamba_d_head": 12}, "mamba_n_heads × mamba_d_head"),
        ("granitemoehybrid", {"layer_types": ["mamba", "attention"]}, "layer_types has 2 entries"),
        ("granitemoehybrid", {"layer_types": ["mamba", "conv", "mamba", "mamba"]}, "unknown layer types"),
        ("granitemoehybrid", {"mamba_n_groups": 3}, "mamba_n_groups"),
        ("granitemoehybrid", {"num_experts_per_tok": 7}, "num_experts_per_tok"),
        ("granitemoehybrid", {"position_embedding_type": "alibi"}, "position_embedding_type"),
        ("mamba2", {"head_dim": 12}, "num_heads × head_dim"),
    ],
)
def test_bad_configs(model_type, change, match):
    base = HYBRID if model_type == "granitemoehybrid" else MAMBA2
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        build_model(dict(base, model_type=model_type, **change))


def test_transformers_layer_type_names_are_accepted():
    cfg = dict(HYBRID, model_type="granitemoehybrid", layer_types=None)
    cfg["layers_block_type"] = ["linear_attention", "full_attention", "mamba", "attention"]
    with torch.device("meta"):
        model = build_model(cfg)
    assert model_kinds(model) == ["mamba", "attention", "mamba", "attention"]
