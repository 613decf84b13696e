"""Loading real checkpoints: parity with transformers on the same weights, and bad input."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from edgelm import load
from edgelm.formats.gguf import read_gguf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = SHARED / "stories260K"
SMOL_DIR = SHARED / "smollm2-135m-instruct"
SMOL = SMOL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def stories_ref():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES / "hf", dtype=torch.float32).eval()


@pytest.mark.parametrize("source", ["hf", "stories260K.bin"])
def test_stories260k_matches_transformers(source, stories_ref):
    model = load(STORIES / source, dtype=torch.float32)
    tokens = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = stories_ref(tokens).logits
    assert max_diff(model(tokens), ref) <= 1e-3


@pytest.fixture(scope="module")
def smol():
    return load(SMOL, dtype=torch.float32, dequantize=True)  # the fp32 reference path


def test_smollm2_gguf_matches_transformers(smol, smol_ref):
    text = open(SHARED.parent / "data" / "python-library-docs.txt").read(4000)
    tokens = torch.tensor([smol.tokenizer.encode(text)[:80]])
    with torch.no_grad():
        ref = smol_ref(tokens).logits
        ours = smol(tokens)
    assert tokens.shape[1] == 80
    assert max_diff(ours, ref) <= 1e-3


def test_smollm2_default_dtype_tracks_reference(smol_ref):
    """The default (fastest) path stays close to fp32: same greedy choices on real text."""
    model = load(SMOL)
    text = "The Python standard library provides modules for file handling, networking and more."
    tokens = torch.tensor([model.tokenizer.encode(text)])
    with torch.no_grad():
        ref = smol_ref(tokens).logits
        ours = model(tokens)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9, f"top-1 agreement with fp32 reference only {agree:.2f}"


def test_inspect_counts_smollm2(smol):
    from edgelm.inspect import analyze

    info = analyze(smol)
    assert info["parameters"] == 134_515_008  # 134.5M as PROVENANCE.md states (tied head counted once)
    assert info["attention"].startswith("GQA (3")
    assert info["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    assert info["checkpoint_tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}


# ---- bad input: each fails with a ValueError naming the problem ----


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(SMOL.read_bytes()[:5_000_000])
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        load(bad)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load(bad)


def copy_stories_hf(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(STORIES / "hf", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def test_corrupt_safetensors_header(tmp_path):
    folder = copy_stories_hf(tmp_path)
    st = folder / "model.safetensors"
    raw = bytearray(st.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 : 8 + 20] = b"{ this is not json!!"
    st.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt or unreadable safetensors"):
        load(folder)


def test_unknown_model_type(tmp_path):
    folder = copy_stories_hf(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "transmogrifier"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown model_type 'transmogrifier'"):
        load(folder)


def test_shape_mismatch_names_tensor(tmp_path):
    folder = copy_stories_hf(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight: checkpoint shape"):
        load(folder)


def test_pickle_checkpoints_refused(tmp_path):
    folder = copy_stories_hf(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        load(folder)


def test_truncated_llama2c(tmp_path):
    bad = tmp_path / "stories260K.bin"
    bad.write_bytes((STORIES / "stories260K.bin").read_bytes()[:400_000])
    with pytest.raises(ValueError, match="truncated llama2.c checkpoint"):
        load(bad)


def test_missing_path():
    with pytest.raises(ValueError, match="no such file or folder"):
        load("/nonexistent/model.gguf")


def test_gguf_metadata_is_plain_python():
    g = read_gguf(SMOL)
    assert g.architecture == "llama"
    assert g.metadata["llama.block_count"] == 30
    assert g.tensors["blk.0.attn_q.weight"].type_name == "Q4_1"
    assert g.tensors["blk.0.attn_q.weight"].shape == (576, 576)


def test_gguf_reader_matches_gguf_py(tmp_path):
    """Our GGUF parser == gguf-py's GGUFReader (the reference) on a file with every metadata
    type, string and numeric arrays, dense and quantized tensors, and a non-default alignment."""
    import gguf
    import numpy as np

    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("t.u32", 7)
    w.add_int64("t.i64", -5)
    w.add_float32("t.f32", 0.25)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "", "ünï", "<|im_start|>"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w.add_tensor("dense", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("half", rng.standard_normal((2, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else ours.metadata[key] == value
    assert ours.metadata["t.strs"] == ["a", "", "ünï", "<|im_start|>"]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type_name == t.tensor_type.name
        assert mine.data.shape == t.data.shape and np.array_equal(mine.data, t.data)
    assert ours.tensors["q8"].shape == (4, 64)
    assert torch.allclose(ours.tensors["q8"].to_torch(), torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))


def test_gguf_tensor_past_end(tmp_path):
    """A file cut inside the tensor data (header intact) names the tensor that runs past the end."""
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(SMOL.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="past the end"):
        read_gguf(bad)
