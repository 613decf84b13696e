"""The command line: `edgelm generate --json` and `edgelm inspect` on real models."""

import json
from pathlib import Path

from edgelm.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES_BIN = str(SHARED / "stories260K" / "stories260K.bin")


def test_generate_json(capsys):
    rc = main(["generate", "--model", STORIES_BIN, "--prompt", "Once upon a time", "--max-tokens", "20",
               "--dtype", "float32", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["text"].startswith(", there was a little girl named Lily")
    for key in ("prompt_tokens", "generated_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
        assert out[key] > 0, key


def test_inspect_json(capsys):
    assert main(["inspect", "--model", STORIES_BIN, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 260_032  # PROVENANCE.md
    assert info["attention"].startswith("GQA")


def test_bad_input_is_one_line_error(capsys):
    rc = main(["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file or folder" in err and "Traceback" not in err


def test_bench_json(capsys):
    rc = main(["bench", "--model", STORIES_BIN, "--dtype", "float32", "--prompt-tokens", "32",
               "--gen-tokens", "16", "--repeat", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["prompt_tokens"] == 32 and report["gen_tokens"] == 16
    assert report["decode_tok_s"] > 0 and report["bandwidth_gb_s"] > 0
    # stories260K: 260,032 fp32 parameters, the tied embedding read in full as the LM head
    assert report["weight_bytes_per_token"] == 260_032 * 4


def test_bench_refuses_oversized_run(capsys):
    rc = main(["bench", "--model", STORIES_BIN, "--prompt-tokens", "500", "--gen-tokens", "100"])
    assert rc == 2 and "exceed the context of 512" in capsys.readouterr().err
