"""Compression results table: perplexity, size on disk and decode speed of one model under
fp32, int8 / int4 round-to-nearest, int4 GPTQ and P-GPTQ, ternary post-training and ternary QAT.

Each row is one process (`--row NAME`), written as JSON under --rows, so the slow rows (GPTQ
calibration, QAT) can run in the background; `--table` prints the Markdown table of the rows found.

    python benchmarks/compression.py --row fp32 --row int8 --row int4 --rows /tmp/h5/rows
    python benchmarks/compression.py --row gptq --rows /tmp/h5/rows         # ~20 min on 1 core
    python benchmarks/compression.py --row qat --qat-dir /tmp/h5/qat --rows /tmp/h5/rows
    python benchmarks/compression.py --table --rows /tmp/h5/rows
    python benchmarks/compression.py --speed --threads 2         # decode tok/s per layout, side by side
    python benchmarks/compression.py --sensitivity --windows 4   # int4 PPL cost, one layer at a time

Evaluation text: the last 1 MB of python-library-docs.txt, windows of --ctx tokens, each scoring
its last ctx - 1 tokens (stride = ctx), the first --windows windows. Calibration: the first 2 MB.
The SmolLM2 GGUF is Q4_1: its dequantized weights are the "fp32" model.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgelm.eval.ppl import perplexity
from edgelm.generate import generate_step
from edgelm.loader import load
from edgelm.quant.quantize import can_quantize, is_default_target, quantize_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ROOT.parent / "shared/data/python-library-docs.txt"
EVAL_CHARS = 1_000_000
ROWS = ("fp32", "int8", "int4", "int4-head8", "int4-g32", "int4-g32-head8", "gptq", "p-gptq", "ternary-ptq", "qat")


def eval_ids(tokenizer, ctx: int, windows: int) -> list[int]:
    text = TEXT.read_text(errors="replace")[-EVAL_CHARS:]
    ids = tokenizer.encode(text[: 12 * ctx * windows], add_special_tokens=False)  # ~4 chars a token
    if len(ids) < ctx * windows:
        raise ValueError(f"evaluation text gives {len(ids)} tokens, fewer than {ctx} x {windows}")
    return ids[: ctx * windows]


def decode_tok_s(model, repeat: int = 2, prompt_len: int = 32, gen: int = 32) -> float:
    """Median greedy decode speed (tokens/s after the first token), batch 1."""
    prompt = model.tokenizer.encode(TEXT.read_text()[:2000])[:prompt_len]
    runs = []
    for _ in range(repeat + 1):  # the first run warms up
        steps = generate_step(model, prompt, max_tokens=gen)
        next(steps)
        t0 = time.perf_counter()
        n = sum(1 for _ in steps)
        runs.append(n / (time.perf_counter() - t0))
    return statistics.median(runs[1:])


def disk_bytes(model) -> int:
    """Size of the folder `save_quantized` writes (what `load` reads back), weights only."""
    from edgelm.convert import save_quantized

    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, d)
        return sum(f.stat().st_size for f in Path(d).iterdir() if f.suffix == ".safetensors")


def build(row: str, args):
    model = load(args.model, dtype=torch.float32, fuse=False, dequantize=True)
    if row in ("int8", "int4", "int4-g32"):
        method, group = ("int8", 32) if row == "int8" else ("int4", 32 if row == "int4-g32" else args.group_size)
        quantize_model(model, method, group, predicate=lambda p, m: is_default_target(p, m) and can_quantize(m, method, group))
        return model, ({} if method == "int8" else {"group_size": group})
    if row in ("int4-head8", "int4-g32-head8"):  # int4 decoder layers, int8 LM head / tied embedding
        group = 32 if row == "int4-g32-head8" else args.group_size
        layers = lambda p, m: ".layers." in f".{p}" and can_quantize(m, "int4", group)  # noqa: E731
        quantize_model(model, "int4", group, predicate=layers)
        quantize_model(model, "int8", predicate=lambda p, m: p == "lm_head")
        return model, {"group_size": group}
    if row in ("gptq", "p-gptq"):
        from edgelm.quant.gptq import calibration_tokens, gptq_quantize

        skip = args.prefix_skip if row == "p-gptq" else 0
        tokens = calibration_tokens(model.tokenizer, TEXT, args.samples, args.seq_len)
        t0 = time.perf_counter()
        opts = dict(act_order=args.act_order, mse=args.mse, head_bits=args.head_bits, head_gptq=args.head_gptq,
                    true_sequential=args.true_sequential,
                    int8_layers=tuple(int(i) for i in args.int8_layers.split(",") if i),
                    prefix_weight=args.prefix_weight if skip else 0.0, prefix_spike=args.prefix_spike if skip else None)
        gptq_quantize(model, tokens, bits=4, group_size=args.group_size, prefix_skip=skip, **opts)
        return model, {"group_size": args.group_size, "calib": f"{args.samples}x{args.seq_len}",
                       "prefix_skip": skip, **{k: v for k, v in opts.items() if v},
                       "quantize_s": round(time.perf_counter() - t0)}
    if row == "ternary-ptq":
        from edgelm.quant.ternary import ternarize_model

        ternarize_model(model, group_size=32)
        return model, {"group_size": 32}
    if row == "qat" and args.qat_latent:  # a run's intermediate checkpoint of latent weights
        return from_latent(model, args.qat_latent)
    if row == "qat":
        model = load(args.qat_dir, dtype=torch.float32, fuse=False)
        info = json.loads((Path(args.qat_dir) / "qat.json").read_text())
        return model, {"group_size": 32, "train_tokens": info["tokens"],
                       **{k: info[k] for k in ("steps", "distill", "train_s")}}
    assert row == "fp32", row
    return model, {}


def from_latent(model, path: str):
    """Ternary model from `edgelm qat --ckpt-every` latent weights (latent/stepN.safetensors), with
    the run's batch size and sequence length in qat-args.json beside it."""
    from safetensors.torch import load_file

    from edgelm.quant.qat import finish_qat, prepare_qat

    prepare_qat(model)
    result = model.load_state_dict(load_file(path), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:4]
    finish_qat(model)
    steps = int(Path(path).stem.split("step")[-1])
    info = json.loads((Path(path).parent / "qat-args.json").read_text())
    return model, {"group_size": 32, "steps": steps, "train_tokens": steps * info["batch_size"] * info["seq_len"]}


def measure(row: str, args) -> dict:
    model, info = build(row, args)
    size = disk_bytes(model)  # saving wants the unfused modules
    model.fuse()
    res = perplexity(model, eval_ids(model.tokenizer, args.ctx, args.windows), args.ctx, args.ctx)
    return {"row": row, "ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "size_bytes": size,
            "decode_tok_s": decode_tok_s(model), "eval_s": round(res.seconds),
            "threads": torch.get_num_threads(), **info}


SPEED_ROWS = ("fp32", "int8", "int4", "int4-g32", "int4-head8", "int4-g32-head8", "ternary-ptq")  # one per layout


def speed(args) -> str:
    """Decode tok/s of each runtime layout, side by side: every layout built once, then --repeat
    alternating rounds (so drift hits all alike), medians and ratios to fp32. GPTQ / P-GPTQ rows
    run the int4 layouts (int4 / int4-g32, with --head-bits 8 int4-head8 / int4-g32-head8) and QAT
    rows the ternary one: same modules, same kernels, so the same speed."""
    models = {}
    for row in SPEED_ROWS:
        model, _ = build(row, args)
        models[row] = model.fuse()
    if args.lut:  # the same ternary model in the plain layout: the pure-torch LUT decode
        models["ternary-lut"] = plain_ternary(build("ternary-ptq", args)[0]).fuse()
    runs = {row: [] for row in models}
    for _ in range(args.repeat):
        for row, model in models.items():
            runs[row].append(decode_tok_s(model, repeat=1, gen=args.gen_tokens))
    med = {row: statistics.median(r) for row, r in runs.items()}
    title = (f"decode tok/s, 32-token prompt + {args.gen_tokens} greedy tokens, {torch.get_num_threads()} thread(s), "
             f"medians of {args.repeat} alternating rounds")
    lines = [title, "", "| layout | tok/s | vs fp32 | rounds |", "|---|---|---|---|"]
    for row, v in med.items():
        lines.append(f"| {LABELS[row]} | {v:.1f} | {v / med['fp32']:.2f}x | {', '.join(f'{x:.1f}' for x in runs[row])} |")
    return "\n".join(lines)


def sensitivity(args) -> str:
    """PPL cost of int4 round-to-nearest (--group-size) in one decoder layer at a time, the others
    fp32, over --windows windows: which layers carry the int4 error (the `--int8-layers` choice).
    Writes the per-layer costs as JSON and a bar chart beside --rows."""
    import copy
    import math

    base, _ = build("fp32", args)
    ids = eval_ids(base.tokenizer, args.ctx, args.windows)
    ref = perplexity(base, ids, args.ctx, args.ctx).nll
    cost = {}
    for i in range(len(base.layers)):
        model, prefix = copy.deepcopy(base), f"model.layers.{i}."
        quantize_model(model, "int4", args.group_size,
                       predicate=lambda p, m, prefix=prefix: p.startswith(prefix) and isinstance(m, torch.nn.Linear))
        cost[i] = 100 * (math.exp(perplexity(model, ids, args.ctx, args.ctx).nll - ref) - 1)
        print(f"layer {i}: {cost[i]:+.2f}% PPL", file=sys.stderr, flush=True)
    out = Path(args.rows)
    (out / f"sensitivity-g{args.group_size}.json").write_text(json.dumps(cost, indent=1))
    plot_sensitivity(cost, out / f"sensitivity-g{args.group_size}.png", args)
    ranked = sorted(cost, key=cost.get, reverse=True)
    total = sum(cost.values())
    lines = [f"int4 g{args.group_size} RTN in one layer at a time: PPL cost vs fp32 ({args.windows} windows of {args.ctx})", "",
             "| rank | layer | PPL cost | share of the sum |", "|---|---|---|---|"]
    lines += [f"| {r + 1} | {i} | {cost[i]:+.2f}% | {cost[i] / total:.0%} |" for r, i in enumerate(ranked[:8])]
    return "\n".join([*lines, f"\nsum over the {len(cost)} layers: {total:+.1f}%"])


def plot_sensitivity(cost: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(list(cost), list(cost.values()), color="tab:blue")
    ax.set_xlabel("decoder layer quantized (others fp32)")
    ax.set_ylabel("PPL cost vs fp32 (%)")
    ax.set_title(f"SmolLM2-135M: int4 g{args.group_size} round-to-nearest, one layer at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plain_ternary(model):
    from edgelm.quant.quantize import set_module
    from edgelm.quant.ternary import BitLinear

    for path, m in list(model.named_modules()):
        if isinstance(m, BitLinear):
            set_module(model, path, BitLinear.from_ternary(m.codes(), m.group_scales(), m.group_size, m.bias, "plain"))
    return model


LABELS = {"fp32": "fp32 (dequantized Q4_1)", "int8": "int8 RTN (per channel)", "int4": "int4 RTN",
          "int4-g32": "int4 RTN g32", "int4-head8": "int4 RTN, int8 LM head",
          "int4-g32-head8": "int4 RTN g32, int8 LM head", "gptq": "int4 GPTQ", "p-gptq": "int4 P-GPTQ",
          "ternary-ptq": "ternary post-training", "qat": "ternary QAT",
          "ternary-lut": "ternary, plain layout (torch LUT)"}


def layout_of(r: dict) -> str:
    """The runtime layout a result row decodes with (its `--speed` line): the tok/s each row
    measured in its own process is in its JSON, but rows ran at different times and loads."""
    name = r["row"]
    if name in ("fp32", "int8"):
        return name
    if name in ("ternary-ptq", "qat"):
        return "ternary + int8 head"
    head8 = r.get("head_bits") == 8 or name.endswith("head8")
    return f"int4 g{r['group_size']}" + (" + int8 head" if head8 else "")


def table(rows_dir: Path) -> str:
    found = [(p.stem, json.loads(p.read_text())) for p in sorted(rows_dir.glob("*.json"))]
    found.sort(key=lambda f: (ROWS.index(f[1]["row"]), len(f[0]), f[0]))  # a row, then its --tag variants
    base = next((r for stem, r in found if stem == "fp32"), None)
    lines = ["| model | PPL | Δ vs fp32 | size on disk (MB) | runs as (decode speed: `--speed`) | notes |",
             "|---|---|---|---|---|---|"]
    keys = ("group_size", "calib", "prefix_skip", "prefix_weight", "prefix_spike", "act_order", "mse", "head_bits", "head_gptq",
            "true_sequential", "int8_layers", "steps", "train_tokens")
    for _, r in found:
        name = r["row"]
        delta = f"{100 * (r['ppl'] / base['ppl'] - 1):+.4g}%" if base else "n/a"
        notes = "per output channel" if name == "int8" else ", ".join(f"{k}={r[k]}" for k in keys if k in r)
        head = "GPTQ int4" if r.get("head_gptq") and r.get("head_bits") != 8 else "GPTQ int8" if r.get("head_gptq") else "int8"
        label = LABELS[name] + (f", {head} LM head" if r.get("head_gptq") or r.get("head_bits") == 8 else "")
        lines.append(f"| {label} | {r['ppl']:.4g} | {delta} | {r['size_bytes'] / 1e6:.1f} | {layout_of(r)} | {notes} |")
    any_row = found[0][1]
    lines.append(f"\nPPL over {any_row['tokens']} tokens of the last 1 MB of python-library-docs.txt; "
                 f"{any_row['threads']} thread(s).")
    return "\n".join(lines)


def plot_qat(qat_json: Path, out: Path, rows_dir: Path | None = None) -> None:
    """Cross-entropy and KL per step of an `edgelm qat` run (its qat.json), with the evaluation NLL
    of its checkpoints and of fp32 / post-training ternary where --rows holds those rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = json.loads(qat_json.read_text())
    steps = [h["step"] for h in info["history"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(steps, [h["ce"] for h in info["history"]], lw=1, label="cross-entropy (train batch)")
    ax.plot(steps, [h["kl"] for h in info["history"]], lw=1, label="KL(teacher || student)")
    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))] if rows_dir else []
    evals = sorted((r["steps"], r["nll"]) for r in rows if r["row"] == "qat" and "steps" in r)
    if evals:
        ax.plot(*zip(*evals), "ko-", label="evaluation NLL (last 1 MB, 4,088 tokens)")
    for r in rows:
        if r["row"] in ("fp32", "ternary-ptq"):
            ax.axhline(r["nll"], ls="--", color="gray" if r["row"] == "fp32" else "tab:red", lw=1)
            ax.annotate(f"{LABELS[r['row']]}: {r['nll']:.2f}", (steps[len(steps) // 3], r["nll"]), va="bottom", fontsize=8)
    ax.set_ylim(0, max([ax.get_ylim()[1]] + [r["nll"] + 1.5 for r in rows if r["row"] == "ternary-ptq"]))
    ax.set_xlabel(f"step ({info['batch_size']} x {info['seq_len']} tokens, lr {info['lr']}, re-warm {info['warmup']})")
    ax.set_ylabel("nats per token")
    ax.set_title("ternary QAT of SmolLM2-135M from its fp weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--row", action="append", choices=ROWS, default=[])
    p.add_argument("--rows", default="/tmp/h5/rows", help="folder of per-row JSON results")
    p.add_argument("--table", action="store_true")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prefix-skip", type=int, default=4)
    p.add_argument("--prefix-weight", type=float, default=0.0, help="p-gptq: weight of the skipped positions in H")
    p.add_argument("--prefix-spike", type=float, default=None,
                   help="p-gptq: skip/down-weight the prefix only in linears whose prefix peak is > this x the rest's")
    p.add_argument("--act-order", action="store_true", help="gptq rows: columns by decreasing H diagonal")
    p.add_argument("--mse", action="store_true", help="gptq rows: clip-searched int4 group ranges")
    p.add_argument("--head-bits", type=int, choices=[4, 8], default=4, help="gptq rows: LM head bits")
    p.add_argument("--head-gptq", action="store_true", help="gptq rows: GPTQ the LM head too")
    p.add_argument("--true-sequential", action="store_true", help="gptq rows: H per input group after the ones before")
    p.add_argument("--int8-layers", default="", help="gptq rows: comma-separated decoder layers in int8")
    p.add_argument("--tag", default="", help="row variant: results go to ROW-TAG.json (a separate table line)")
    p.add_argument("--qat-dir", default="/tmp/h5/qat")
    p.add_argument("--qat-latent", default=None, help="row qat from a latent/stepN.safetensors checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-qat", default=None, help="write the QAT loss curve of --qat-dir to this PNG")
    p.add_argument("--speed", action="store_true", help="decode tok/s of every runtime layout, side by side")
    p.add_argument("--sensitivity", action="store_true", help="PPL cost of int4 RTN in one layer at a time")
    p.add_argument("--repeat", type=int, default=5, help="--speed: alternating rounds")
    p.add_argument("--lut", action="store_true", help="--speed: add the ternary model's pure-torch LUT decode (slow)")
    p.add_argument("--gen-tokens", type=int, default=64, help="--speed: greedy tokens per round")
    args = p.parse_args()
    if args.plot_qat:
        plot_qat(Path(args.qat_dir) / "qat.json", Path(args.plot_qat), Path(args.rows))
    torch.set_num_threads(args.threads)
    rows_dir = Path(args.rows)
    rows_dir.mkdir(parents=True, exist_ok=True)
    if args.speed:
        print(speed(args), flush=True)
    if args.sensitivity:
        print(sensitivity(args), flush=True)
    for row in args.row:
        result = measure(row, args)
        (rows_dir / f"{row}{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result), file=sys.stderr)
    if args.table:
        print(table(rows_dir))


if __name__ == "__main__":
    main()
