"""Chunk-wise rollout throughput: the same long-tailed RL workload with and without a per-stage
token budget, in one run (MiniCPM4 reports ~1.7x faster RL steps from chunking).

Workload: --prompts story openers x G samples, sampled at temperature 1 with EOS ignored, each
sample's length drawn from a long tail (80% in [16, 48] tokens, 20% in [160, 320]). A stage holds
--stage-size trajectories (= the engine's max_batch). Without a budget a stage runs until its
longest sample ends; with --budget the tail is parked and the batch refilled with new groups.
Reports, per setting, the median over --repeat runs (alternating settings) of generated tokens/s,
batch occupancy (tokens per engine step / max_batch), stages and engine steps, and the ratio.

    python benchmarks/rollout.py --repeat 3          # random 17M Llama, budgets 16 and 32
    python benchmarks/rollout.py --model stories260K
    python benchmarks/rollout.py --model smollm2-fp32 --budget 16 --threads 2   # a real 135M model
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from edgelm.engine import LLMEngine
from edgelm.loader import load
from edgelm.rl.rollout import ChunkedRollout

SHARED = Path(__file__).resolve().parents[2] / "shared/models"
MODEL = SHARED / "stories260K/stories260K.bin"
SMOLLM2 = SHARED / "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
OPENERS = [
    "Once upon a time",
    "One day",
    "Lily and Tom",
    "The little dog",
    "There was a big tree",
    "Sam had a",
]


def random_llama(hidden: int = 512, seed: int = 0):
    """A random Llama (~17M parameters at hidden 512): big enough that a decode step's cost is
    mostly its weight reads, as for real models, not per-sequence Python (stories260K's case)."""
    from edgelm.models import build_model

    config = dict(
        model_type="llama",
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = build_model(config).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model.fuse()  # fused QKV and gate/up projections, as `load` leaves every model


def encode(model, text: str) -> list[int]:
    if model.tokenizer is not None:
        return model.tokenizer.encode(text)
    return [1 + (ord(c) % 4000) for c in text]  # random model: any fixed ids will do


def lengths(num_prompts: int, G: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    draw = lambda: rng.randint(160, 320) if rng.random() < 0.2 else rng.randint(16, 48)
    return [[draw() for _ in range(G)] for _ in range(num_prompts)]


def run(model, budget: int | None, args) -> dict:
    engine = LLMEngine(model, max_batch=args.max_batch)
    rollout = ChunkedRollout(
        engine, args.G, budget, 320, args.stage_size, temperature=1.0, ignore_eos=True, seed=1
    )
    for i, limits in enumerate(lengths(args.prompts, args.G, seed=0)):
        rollout.add_prompt(encode(model, OPENERS[i % len(OPENERS)]), max_tokens=limits)
    start = time.perf_counter()
    groups = rollout.run()
    s = rollout.stats
    assert len(groups) == args.prompts
    return {
        "tokens_per_s": s.num_tokens / (time.perf_counter() - start),
        "occupancy": s.occupancy,
        "stages": s.num_stages,
        "steps": s.num_steps,
        "tokens": s.num_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("-G", type=int, default=4)
    p.add_argument("--model", choices=["random", "stories260K", "smollm2", "smollm2-fp32"], default="random",
                   help="smollm2: SmolLM2-135M as shipped (int4 layers); smollm2-fp32: dequantized at load")
    p.add_argument("--hidden", type=int, default=512, help="random model width (512: ~17M parameters)")
    p.add_argument("--max-batch", type=int, default=16, help="engine batch (sequences decoded together)")
    p.add_argument("--stage-size", type=int, default=16, help="trajectories per stage (rollout batch)")
    p.add_argument("--budget", type=int, action="append", default=None, help="repeatable (default 16 and 32)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "random":
        model = random_llama(args.hidden)
    elif args.model.startswith("smollm2"):
        model = load(SMOLLM2, dtype=torch.float32, dequantize=args.model == "smollm2-fp32")
    else:
        model = load(MODEL, dtype=torch.float32)
    settings = [None] + (args.budget or [16, 32])
    runs = {b: [] for b in settings}
    run(model, settings[1], args)  # warm-up
    for _ in range(args.repeat):
        for b in settings:
            runs[b].append(run(model, b, args))
    base = statistics.median(r["tokens_per_s"] for r in runs[None])
    print("| budget | tokens/s (median) | occupancy | stages | engine steps | speed-up |")
    print("|---|---|---|---|---|---|")
    for b, rs in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        occ = statistics.median(r["occupancy"] for r in rs)
        print(
            f"| {b or 'none'} | {tps:.0f} | {occ:.2f} | {rs[0]['stages']} | {rs[0]['steps']} | {tps / base:.2f}x |"
        )
    for b in settings[1:]:  # the ratio of each alternating round, to show the spread
        ratios = [r["tokens_per_s"] / r0["tokens_per_s"] for r, r0 in zip(runs[b], runs[None])]
        print(f"budget {b}: speed-up per round " + ", ".join(f"{x:.2f}x" for x in ratios))
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
