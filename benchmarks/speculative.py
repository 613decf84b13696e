"""Speculative decoding on SmolLM2-135M (fp32 or int4 target): decode tok/s and mean accepted
length per proposer, with and without FR-Spec, on a chat prompt and a code-continuation prompt.

    python benchmarks/speculative.py [--model PATH] [--target fp32|int4] [--max-tokens 64]
                                     [--threads 2] [--num-draft 4] [--cost] [--branches 2,2] [--tries 4]

Plain greedy `generate_step` is measured in the same run as the baseline, and every speculative
run is checked token-for-token against it. Prints a Markdown table (and JSON with --json).
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from edgelm import load
from edgelm.config import configure_runtime, set_threads
from edgelm.generate import generate_step
from edgelm.speculative import (
    DraftModelProposer,
    LayerSkipProposer,
    NgramProposer,
    SpeculativeStats,
    build_frequency_ranking,
    speculative_generate_step,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_MODEL = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = SHARED / "data" / "python-library-docs.txt"
CHAT = "Explain in a few sentences why the sky is blue."
CODE = (
    "import numpy as np\n\n\ndef moving_average(values, window):\n"
    '    """Return the moving average of `values` over `window` samples."""\n'
)


def prompts(tokenizer) -> dict[str, list[int]]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}])
    return {"chat": tokenizer.encode(chat, add_special_tokens=False), "code": tokenizer.encode(CODE)}


def self_quant(model):
    """A group-32 int4 copy of the target (the self-quant draft, or the int4 target)."""
    from edgelm.speculative.cli import self_quant_draft

    return self_quant_draft(model, "int4"), "int4"


def proposers(
    model, ids_fr: torch.Tensor, layers: int, quant, quant_name: str, trees=((2, 2),), tries=4, confident=0.8
) -> dict:
    """name -> (FR-Spec size or None, factory). No self-quant draft when the target is int4 itself.
    Tree variants: model drafts with top-b tokens per depth for each b-tuple of `trees`, n-gram
    tries of `tries` continuations; dynamic trees branch only where the draft's top p < `confident`."""
    V = len(ids_fr)
    cases = {
        "n-gram (prompt lookup)": (None, lambda: NgramProposer(n_max=3)),
        "n-gram, matches of 2..5": (None, lambda: NgramProposer(n_max=5, n_min=2)),
        f"n-gram 2..5, trie of {tries}": (None, lambda: NgramProposer(n_max=5, n_min=2, branches=tries)),
        f"layer-skip {layers}/{len(model.layers)}": (None, lambda: LayerSkipProposer(model, layers)),
        f"layer-skip {layers}/{len(model.layers)} + FR": (
            V,
            lambda: LayerSkipProposer(model, layers, ids_fr),
        ),
    }
    if quant is not None:
        cases[f"self-quant {quant_name}"] = (None, lambda: DraftModelProposer(quant))
        cases[f"self-quant {quant_name} + FR"] = (V, lambda: DraftModelProposer(quant, ids_fr))
        for b in trees:
            tree = ",".join(map(str, b))
            cases[f"self-quant {quant_name}, tree {tree}"] = (None, lambda b=b: DraftModelProposer(quant, branches=b))
            cases[f"self-quant {quant_name}, tree {tree} where p < {confident}"] = (
                None,
                lambda b=b: DraftModelProposer(quant, branches=b, confident=confident),
            )
            cases[f"self-quant {quant_name} + FR, tree {tree}"] = (
                V,
                lambda b=b: DraftModelProposer(quant, ids_fr, branches=b),
            )
    return cases


def load_dense(path):
    """fp32 weights even from a GGUF (newer loaders keep GGUF blocks quantized unless asked)."""
    try:
        return load(path, dtype=torch.float32, dequantize=True)
    except TypeError:
        return load(path, dtype=torch.float32)


@torch.inference_mode()
def forward_cost(model, ids: list[int], lengths=(1, 2, 3, 5, 9), repeat: int = 7) -> dict[int, float]:
    """Median ms of one cached forward over L new tokens after the prompt (a verify of k = L - 1
    drafts), trimmed back after each call: what a verify costs relative to a plain step."""
    cache = model.make_cache()
    model(torch.tensor([ids]), cache, num_logits=1)
    out = {}
    for L in lengths:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            model(torch.tensor([ids[:L]]), cache)
            times.append(time.perf_counter() - t)
            for c in cache:
                c.trim(L)
        out[L] = statistics.median(times) * 1e3
    return out


@torch.inference_mode()
def head_cost(models: dict, ranking: torch.Tensor, sizes, repeat: int = 41) -> list[dict]:
    """Median ms of one draft LM-head call (one row) restricted to the top-V ids of `ranking`, per
    model (fp32 head: layer-skip drafts; int4 head: the self-quant draft) and V (full = no FR-Spec)."""
    from edgelm.speculative.frspec import restrict_lm_head

    rows = []
    for name, model in models.items():
        h = torch.randn(1, 1, model.config.hidden_size)
        for V in sizes:
            view = model if V >= len(ranking) else restrict_lm_head(model, ranking[:V])
            for _ in range(3):
                view.logits(h)
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                view.logits(h)
                times.append(time.perf_counter() - t)
            rows.append({"head": name, "V": min(V, len(ranking)), "ms": statistics.median(times) * 1e3})
    return rows


def timed(steps) -> tuple[list[int], float]:
    """Run a token generator; -> (tokens, decode tok/s after the first token, like stream_generate)."""
    tokens, t_first = [], 0.0
    for token, _ in steps:
        tokens.append(token)
        if len(tokens) == 1:
            t_first = time.perf_counter()
    return tokens, (len(tokens) - 1) / (time.perf_counter() - t_first)


def run(model, ids_by_prompt, cases: dict, args) -> list[dict]:
    """Per prompt, `args.repeat` rounds of plain greedy then every proposer (alternating, so load
    changes on a shared machine hit all alike); tok/s are medians, the speed-up is the ratio of
    medians. Greedy runs are deterministic, so the counts come from the last round."""
    rows = []
    for prompt, ids in ids_by_prompt.items():
        speeds = {name: [] for name in ["plain greedy", *cases]}
        results = {}
        for _ in range(args.repeat):
            ref, base = timed(generate_step(model, ids, max_tokens=args.max_tokens))
            speeds["plain greedy"].append(base)
            for name, (fr, make) in cases.items():
                stats = SpeculativeStats()
                steps = speculative_generate_step(
                    model, ids, make(), num_draft=args.num_draft, max_tokens=args.max_tokens, stats=stats,
                    verify_cost=args.verify_cost,
                )
                out, tps = timed(steps)
                speeds[name].append(tps)
                results[name] = (fr, stats, out == ref)
                print(f"  {prompt:5} {name:32} {tps:6.2f} tok/s  x{tps / base:.2f}", flush=True)
        base = statistics.median(speeds["plain greedy"])
        rows.append({"prompt": prompt, "proposer": "plain greedy", "fr": "-", "tok_s": base,
                     "speedup": 1.0, "mal": 1.0, "acc": None, "same": True})
        for name, (fr, stats, same) in results.items():
            tps = statistics.median(speeds[name])
            rows.append({"prompt": prompt, "proposer": name, "fr": fr or "-", "tok_s": tps,
                         "speedup": tps / base, "mal": stats.mean_accepted_length,
                         "acc": stats.acceptance_rate, "same": same})
    return rows


def markdown(rows: list[dict]) -> str:
    head = [
        "prompt",
        "proposer",
        "FR-Spec V",
        "decode tok/s",
        "speedup",
        "mean accepted length",
        "acceptance",
    ]
    lines = ["| " + " | ".join([*head, "= greedy"]) + " |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        acc = "-" if r["acc"] is None else f"{r['acc']:.0%}"
        lines.append(
            f"| {r['prompt']} | {r['proposer']} | {r['fr']} | {r['tok_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['mal']:.2f} | {acc} | {'yes' if r['same'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-draft", type=int, default=4)
    p.add_argument("--layers", type=int, default=24, help="decoder layers the layer-skip draft keeps")
    p.add_argument("--frspec-size", type=int, default=8192)
    p.add_argument("--branches", default="2,2",
                   help="tree drafts: top-b tokens at depth 1, 2, ...; several trees separated by ';'")
    p.add_argument("--confident", type=float, default=0.8, help="dynamic trees: branch where the draft's top p is below")
    p.add_argument("--tries", type=int, default=4, help="tree drafts: n-gram continuations merged into a trie")
    p.add_argument("--target", choices=["fp32", "int4"], default="fp32", help="int4: group-32 weight-only")
    p.add_argument("--cost", action="store_true",
                   help="first measure verify cost vs a one-token step and tune the adaptive draft length to it")
    p.add_argument("--verify-cost", type=float, default=0.05, help="extra cost per draft token (without --cost)")
    p.add_argument("--head-cost", action="store_true", help="first time the draft LM head restricted to V rows")
    p.add_argument("--repeat", type=int, default=1, help="alternating rounds; medians")
    p.add_argument("--prompts", default="chat,code", help="comma list: chat,code")
    p.add_argument("--proposers", default=None, help="only proposers whose name contains one of these (comma list)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    set_threads(args.threads)
    configure_runtime()
    model = load_dense(args.model)
    ids_fr = build_frequency_ranking(model.tokenizer, TEXT, [args.frspec_size])[args.frspec_size]
    quant, quant_name = self_quant(model)
    if args.target == "int4":  # the int4 copy is the target; its plain decode is the baseline
        model, quant = quant, None
    load_start = os.getloadavg()[0]
    if args.head_cost:
        full = build_frequency_ranking(model.tokenizer, TEXT, [model.tokenizer.vocab_size])[model.tokenizer.vocab_size]
        heads = {"fp32": model} | ({quant_name: quant} if quant is not None else {})
        sizes = [8192, 16384, 32768, len(full)]
        print("| draft LM head | V | ms per call | ms per 1K rows |\n|---|---:|---:|---:|")
        for r in head_cost(heads, full, sizes):
            print(f"| {r['head']} | {r['V']} | {r['ms']:.3f} | {r['ms'] / r['V'] * 1e3:.4f} |", flush=True)
    if args.cost:
        ms = forward_cost(model, prompts(model.tokenizer)["code"])
        print("forward over L new tokens (ms, x one-token step): "
              + ", ".join(f"L={L}: {t:.1f} ({t / ms[1]:.2f}x)" for L, t in ms.items()), flush=True)
        args.verify_cost = max(0.0, (ms[5] / ms[1] - 1) / 4)  # extra cost per draft token, measured
        print(f"adaptive draft length uses verify cost {args.verify_cost:.3f} per draft token", flush=True)
    trees = [tuple(int(b) for b in tree.split(",")) for tree in args.branches.split(";")]
    cases = proposers(model, ids_fr, args.layers, quant, quant_name, trees, args.tries, args.confident)
    if args.proposers:
        cases = {k: v for k, v in cases.items() if any(w in k for w in args.proposers.split(","))}
    chosen = {k: v for k, v in prompts(model.tokenizer).items() if k in args.prompts.split(",")}
    rows = run(model, chosen, cases, args)
    print(
        f"\nSmolLM2-135M {args.target} target, {args.max_tokens} tokens, {args.threads} threads, "
        f"k <= {args.num_draft} (adaptive), FR-Spec V = {args.frspec_size} of {model.tokenizer.vocab_size}, "
        f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}\n"
    )
    print(markdown(rows))
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
