"""`edgelm profile`: the SLM survey's runtime study as a command.

For each back-end x quantization x thread count it measures first-token time and prefill speed vs
prompt length, decode ms/token vs context position, and (native back-end) latency by operator class
and memory by component. Results go to JSON, a Markdown report and PNG plots.
"""

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgelm.profiler import memory
from edgelm.profiler.ops import OpTimer

QUICK = {"prompt_lengths": [16, 128], "gen_tokens": 8}


@dataclass
class Sweep:
    model: str
    backends: list[str] = field(default_factory=lambda: ["native"])
    quants: list[str] = field(default_factory=lambda: ["fp32"])
    prompt_lengths: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])
    gen_tokens: int = 32
    threads: list[int] = field(default_factory=lambda: [2])

    def runs(self) -> list[tuple[str, str, int]]:
        return [(b, q, t) for b in self.backends for q in self.quants for t in self.threads
                if b == "native" or q == self.quants[0]]  # peers run their file's own format once


def check_fits(sweep: Sweep, weight_bytes: int, kv_bytes_per_token: int) -> None:
    """Refuse up front when the largest run would not fit in available memory."""
    need = weight_bytes + kv_bytes_per_token * (max(sweep.prompt_lengths) + sweep.gen_tokens)
    have = memory.available_bytes()
    if have and need > 0.8 * have:
        raise ValueError(
            f"this sweep needs about {need / 2**30:.1f} GiB (weights {weight_bytes / 2**30:.1f} GiB + KV cache "
            f"at {max(sweep.prompt_lengths)} tokens) but only {have / 2**30:.1f} GiB is available; "
            "use shorter --prompt-lengths or a smaller quantization"
        )


def make_executor(backend: str, path: str, quant: str, threads: int):
    from edgelm.backends import get_executor

    cls = get_executor(backend)
    if backend != "native":
        return cls(path, threads=threads)
    return cls(path, threads=threads, **native_options(quant))


def native_options(quant: str) -> dict:
    options = {"fp32": {"dtype": torch.float32}, "bf16": {"dtype": torch.bfloat16}}
    if quant in options:
        return options[quant]
    if quant in ("int8", "int4", "gguf"):
        return {"quant": quant}
    raise ValueError(f"unknown quantization {quant!r}; choose from fp32, bf16, int8, int4, gguf")


def time_prompt(ex, ids: list[int], gen_tokens: int) -> dict:
    """TTFT and prefill tok/s for this prompt, then ms/token of each decode step."""
    t0 = time.perf_counter()
    logits = ex.prefill(ids)
    ttft = time.perf_counter() - t0
    steps = []
    for _ in range(gen_tokens):
        t = time.perf_counter()
        logits = ex.decode(int(logits.argmax()))
        steps.append((time.perf_counter() - t) * 1e3)
    return {
        "prompt_tokens": len(ids),
        "ttft_s": ttft,
        "prefill_tok_s": len(ids) / ttft,
        "decode_ms_per_token": statistics.median(steps) if steps else None,
        "decode_ms_by_position": steps,
        "cache_bytes": ex.cache_bytes(),
    }


def op_breakdown(ex, ids: list[int], decode_steps: int = 8) -> dict:
    """Self time per operator class for one prefill and for decode, with coverage of step time."""
    timer, out = OpTimer(ex.model), {}
    with timer.installed():
        t0 = time.perf_counter()
        logits = ex.prefill(ids)
        out["prefill"] = finish(timer, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            logits = ex.decode(int(logits.argmax()))
        out["decode"] = finish(timer, (time.perf_counter() - t0))
    return out


def finish(timer: OpTimer, wall: float) -> dict:
    ops = {k: v for k, v in sorted(timer.totals.items(), key=lambda kv: -kv[1])}
    timer.reset()
    return {"ops_s": ops, "wall_s": wall, "coverage": sum(ops.values()) / wall}


def memory_breakdown(ex, ids: list[int], baseline_rss: int) -> dict:
    ex.prefill(ids[:1])  # allocate nothing big yet; warm the allocator
    rss_before = memory.rss_bytes()
    memory.reset_peak_rss()
    ex.prefill(ids)
    ex.decode(0)
    return memory.breakdown(ex.weight_bytes(), ex.cache_bytes(), baseline_rss, memory.peak_rss_bytes(), rss_before)


def prompt_ids(tokenizer, n: int) -> list[int]:
    docs = Path(__file__).resolve().parents[3] / "shared/data/python-library-docs.txt"
    text = docs.read_text()[-400_000:] if docs.exists() else "Small models run on small devices. " * 4000
    ids = tokenizer.encode(text, add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def run_sweep(sweep: Sweep, progress=None) -> dict:
    baseline = memory.rss_bytes()
    results = []
    for backend, quant, threads in sweep.runs():
        ex = make_executor(backend, sweep.model, quant, threads)
        rows = [time_prompt(ex, prompt_ids(ex.tokenizer, n), sweep.gen_tokens) for n in sweep.prompt_lengths]
        run = {"backend": backend, "quant": quant, "threads": threads, "by_prompt": rows}
        if backend == "native":
            ids = prompt_ids(ex.tokenizer, max(sweep.prompt_lengths))
            run["memory"] = memory_breakdown(ex, ids, baseline)
            run["ops"] = op_breakdown(ex, prompt_ids(ex.tokenizer, min(256, max(sweep.prompt_lengths))))
        results.append(run)
        del ex
        if progress:
            progress()
    return {"model": sweep.model, "machine": machine_info(), "gen_tokens": sweep.gen_tokens, "runs": results}


def machine_info() -> dict:
    from edgelm.config import cpu_flags, physical_cores

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown")
    isa = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"))
    return {"cpu": name, "cores": physical_cores(), "isa": isa, "torch": torch.__version__}


def write_report(report: dict, out_dir: Path) -> list[Path]:
    from edgelm.profiler import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(report, indent=2))
    images = plots.draw_all(report, out_dir)
    (out_dir / "profile.md").write_text(plots.markdown(report, images))
    return [out_dir / "profile.json", out_dir / "profile.md", *images]
