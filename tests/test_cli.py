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
