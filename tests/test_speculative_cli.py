"""Speculative decoding end to end: `edgelm generate/bench --speculative ...` and `edgelm frspec
build` on stories260K give exactly the plain greedy text; speculation composed with an int4/int8
target and with block-sparse attention stays lossless."""

import copy
import json
from pathlib import Path

import pytest
import torch

from edgelm import load
from edgelm.cli import main
from edgelm.generate import generate_step
from edgelm.layers.sparse_attention import SparseConfig
from edgelm.speculative import DraftModelProposer, NgramProposer, SpeculativeStats
from edgelm.speculative import speculative_generate_step
from edgelm.speculative.cli import self_quant_draft

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = str(SHARED / "models" / "stories260K" / "stories260K.bin")
TEXT = str(SHARED / "data" / "python-library-docs.txt")
PROMPT = "Tom had a red ball. Tom had a red ball. Tom had a red"


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def generate_json(capsys, *extra) -> dict:
    argv = ["generate", "--model", STORIES, "--prompt", PROMPT, "--max-tokens", "64", "--threads", "1"]
    code, out, err = run_cli(capsys, *argv, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def frspec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fr") / "fr.safetensors"
    argv = ["frspec", "build", "--model", STORIES, "--text", TEXT, "--sizes", "64,256",
            "--max-lines", "300", "--out", str(path)]
    assert main(argv) == 0 and path.exists()
    return path


@pytest.mark.parametrize(
    "flags",
    [
        ["--speculative", "ngram"],
        ["--speculative", "layer-skip", "--draft-layers", "3"],
        ["--speculative", "self-quant", "--draft-quant", "int8"],
        ["--speculative", "draft", "--draft-model", STORIES, "--num-draft", "3"],
        ["--speculative", "self-quant", "--frspec", "FR", "--frspec-size", "64"],
        ["--speculative", "self-quant", "--tree", "2,2"],
        ["--speculative", "ngram", "--tree", "3"],
    ],
    ids=["ngram", "layer-skip", "self-quant", "draft", "self-quant-frspec", "self-quant-tree", "ngram-trie"],
)
def test_cli_generate_speculative_equals_plain(capsys, frspec_file, flags):
    flags = [str(frspec_file) if f == "FR" else f for f in flags]
    plain = generate_json(capsys)
    spec = generate_json(capsys, *flags)
    assert spec["text"] == plain["text"] and spec["generated_tokens"] == plain["generated_tokens"] == 64
    stats = spec["speculative"]
    assert stats["verify_steps"] < 64 and stats["mean_accepted_length"] >= 1.0
    if flags[1] in ("self-quant", "draft") and "--frspec" not in flags:  # near-copies: most drafts pass
        assert stats["accepted"] > 0.5 * stats["proposed"] > 0
    assert stats["proposed"] > 0
    assert "speculative" not in plain


def test_cli_stats_line_and_bad_flags(capsys):
    code, _, err = run_cli(capsys, "generate", "--model", STORIES, "--prompt", PROMPT, "--max-tokens", "8",
                           "--threads", "1", "--speculative", "ngram")
    assert code == 0 and "[speculative: " in err and "mean accepted length" in err
    code, _, err = run_cli(capsys, "generate", "--model", STORIES, "--prompt", "x", "--draft-model", STORIES)
    assert code == 2 and "--speculative draft and --draft-model PATH go together" in err
    code, _, err = run_cli(capsys, "generate", "--model", STORIES, "--prompt", "x", "--speculative", "ngram",
                           "--num-draft", "0")
    assert code == 2 and "--num-draft must be positive" in err
    for tree in ("0", "2,x"):
        code, _, err = run_cli(capsys, "generate", "--model", STORIES, "--prompt", "x", "--speculative", "ngram",
                               "--tree", tree)
        assert code == 2 and "--tree takes positive integers" in err


def test_cli_bench_reports_acceptance_and_speedup(capsys):
    code, out, err = run_cli(capsys, "bench", "--model", STORIES, "--prompt-tokens", "48", "--gen-tokens", "24",
                             "--repeat", "1", "--threads", "1", "--speculative", "ngram", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["identical_to_plain"] is True
    assert report["mean_accepted_length"] >= 1.0 and report["speculative_speedup"] > 0
    assert report["plain_decode_tok_s"] > 0 and report["speculative_decode_tok_s"] > 0


# ---------------------------------------------------------------- composition (CPM.cu's combination)


def greedy(model, ids, n):
    return [t for t, _ in generate_step(model, ids, max_tokens=n)]


def speculate(model, ids, proposer, n):
    stats = SpeculativeStats()
    out = [t for t, _ in speculative_generate_step(model, ids, proposer, max_tokens=n, stats=stats)]
    return out, stats


@pytest.fixture(scope="module")
def stories():
    return load(STORIES, dtype=torch.float32)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_target_is_lossless(stories, method):
    target = self_quant_draft(stories, method)  # a quantized copy (layers int4/int8 can hold)
    ids = stories.tokenizer.encode(PROMPT)
    ref = greedy(target, ids, 64)
    assert ref != greedy(stories, ids, 64) or method == "int8"  # int4 really changes the model
    draft = self_quant_draft(stories, "int4")
    for proposer in (NgramProposer(), DraftModelProposer(draft), DraftModelProposer(draft, branches=(2, 2))):
        out, stats = speculate(target, ids, proposer, 64)
        assert out == ref and stats.num_proposed > 0, type(proposer).__name__


def test_sparse_attention_target_is_lossless(stories):
    """Block-sparse attention past 64 tokens (blocks of 16, top-2 + a 32-token window) on a
    ~400-token prompt: speculation verifies k + 1 queries at once through the sparse path and
    trims its compressed-key cache, and must still give the sparse model's own greedy tokens."""
    sparse = copy.deepcopy(stories).set_sparse_attention(
        SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, window_size=32,
                     topk=2, dense_len=64, query_chunk=16)
    )
    text = Path(TEXT).read_text()[:4000]
    ids = stories.tokenizer.encode(text)[:400]
    ref = greedy(sparse, ids, 32)
    with torch.inference_mode():  # the sparse path is really taken: logits differ from dense
        assert not torch.allclose(sparse(torch.tensor([ids]))[0, -1], stories(torch.tensor([ids]))[0, -1], atol=1e-3)
    tree = DraftModelProposer(stories, branches=(2, 2))  # verified as its chain: sparse layers take no trees
    for proposer in (NgramProposer(), DraftModelProposer(stories), tree):  # the dense model drafts
        out, stats = speculate(sparse, ids, proposer, 32)
        assert out == ref and stats.num_proposed > 0, type(proposer).__name__
