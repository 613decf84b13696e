"""The profiler: operator breakdown covers the step, memory breakdown adds up to peak RSS."""

import json
from pathlib import Path

import pytest

from edgelm.cli import main
from edgelm.profiler import memory
from edgelm.profiler.profile import Sweep, check_fits, run_sweep, write_report

SHARED = Path(__file__).resolve().parents[2] / "shared/models"
STORIES = str(SHARED / "stories260K" / "stories260K.bin")
SMOL = str(SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_stories_sweep_report_and_plots(tmp_path):
    report = run_sweep(Sweep(STORIES, prompt_lengths=[16, 64], gen_tokens=4, threads=[1]))
    run = report["runs"][0]
    assert [r["prompt_tokens"] for r in run["by_prompt"]] == [16, 64]
    for phase in ("prefill", "decode"):
        ops = run["ops"][phase]
        assert ops["coverage"] >= 0.8, ops  # a 260K model: fixed per-call overhead is visible
        assert {"qkv", "o", "gate_up", "down", "lm_head", "attention", "norm"} <= set(ops["ops_s"])
    files = write_report(report, tmp_path)
    assert all(f.exists() and f.stat().st_size > 0 for f in files)
    assert sum(f.suffix == ".png" for f in files) == 5
    assert "time by operator class" in (tmp_path / "profile.md").read_text()


def test_smollm2_breakdowns_cover_time_and_memory():
    report = run_sweep(Sweep(SMOL, prompt_lengths=[256], gen_tokens=2, threads=[2]))
    for phase in ("prefill", "decode"):
        assert report["runs"][0]["ops"][phase]["coverage"] >= 0.95  # of the measured step time
    mem = report["runs"][0]["memory"]
    assert mem["weights"] > 500e6 and mem["kv_cache"] > 0
    assert abs(mem["sum"] - mem["measured_peak_rss"]) <= 0.10 * mem["measured_peak_rss"], mem


def test_sweep_larger_than_memory_is_refused():
    sweep = Sweep(STORIES, prompt_lengths=[10**9])
    with pytest.raises(ValueError, match="GiB is available"):
        check_fits(sweep, weight_bytes=1 << 30, kv_bytes_per_token=1 << 20)


def test_profile_cli_rejects_unknown_backend(tmp_path, capsys):
    rc = main(["profile", "--model", STORIES, "--backend", "onnx", "--quick", "--out", str(tmp_path)])
    assert rc == 2 and "unknown back-end 'onnx'" in capsys.readouterr().err


def test_peak_rss_reset_works():
    assert memory.reset_peak_rss()
    assert memory.peak_rss_bytes() <= memory.rss_bytes() * 1.05
