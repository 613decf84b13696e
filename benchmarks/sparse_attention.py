"""InfLLM v2 block-sparse vs dense attention on this CPU: speed, then quality.

speed (default): end-to-end prefill (chunks of 512, as `generate` does) + greedy decode, dense and
sparse in the same run, 2 threads. Attention-layer time is measured with forward hooks on every
`self_attn` (projections + RoPE + attention), outside the engine.
    Model: SmolLM2-135M-Instruct's shape (hidden 576, 9 query / 3 KV heads, head_dim 64) with its
    real weights (GGUF, fp32) truncated to --layers layers (a 30-layer dense prefill at 32K would take
    most of an hour on 2 cores) and the context raised to 64K. Beyond the trained 8K the text it
    would generate is meaningless, but block selections come from real weights on real text, which
    matters for the executor (random weights select near-random blocks: the worst case for the
    chunked executor's union of blocks). --random uses random weights of the same shape.
    Sparse settings: MiniCPM4's defaults with the lengths scaled by SmolLM2's 8K / MiniCPM4's 32K
    context: block 64, kernel 32 stride 16, init 1, window 512, topk 16, dense_len 2048.
quality: pass-key accuracy and long-text perplexity on the real 30-layer SmolLM2 at the given
    lengths, dense vs sparse with settings that make sparsity apply at 2K-8K
    (block 64, window 512, topk 16, dense_len 1024: 26 blocks = 1,664 keys per query).

On a shared, oversubscribed machine use `--threads 1 --clock cpu`: with 2 threads every parallel
ATen op waits for the busy second core (~4-8 ms per op measured here, vs 0.03 ms on one thread),
which punishes the sparse path's many small ops and says nothing about the algorithm.

    .venv/bin/python benchmarks/sparse_attention.py --lengths 4096,8192 --layers 2
    .venv/bin/python benchmarks/sparse_attention.py --threads 1 --clock cpu --lengths 65536 --max-dense-prefill 32768
    .venv/bin/python benchmarks/sparse_attention.py --quality passkey --lengths 2048
    .venv/bin/python benchmarks/sparse_attention.py --quality ppl --lengths 4096
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from edgelm.config import configure_runtime
from edgelm.generate import prefill
from edgelm.kernels import llama as fast_step
from edgelm.layers.sparse_attention import SparseConfig

ROOT = Path(__file__).resolve().parents[2]
clock = time.perf_counter  # --clock cpu: time.process_time (robust on a shared, oversubscribed machine)
MODEL = ROOT / "shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ROOT / "shared/data/python-library-docs.txt"
# MiniCPM4's window and dense_len scaled by SmolLM2's 8K / MiniCPM4's 32K context; top-24 blocks: the
# smallest of 16/24/32 keeping 8K perplexity within 2% of dense (README). One setting for speed and quality.
SPEED_SPARSE = SparseConfig(window_size=512, topk=24, dense_len=2048)
QUALITY_SPARSE = SPEED_SPARSE


def load_model(num_layers: int | None, random: bool, context: int = 65536):
    from edgelm import load

    model = load(MODEL, dtype=torch.float32)
    if num_layers:
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    if random:
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            p.data = torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5
    model.config.max_position_embeddings = max(context, model.config.max_position_embeddings)
    return model


def text_tokens(model, n: int, offset: int = 2_000_000) -> list[int]:
    """n tokens of the evaluation part of the docs text (the last 1 MB), wrapped around if needed."""
    text = TEXT.read_text()
    ids = model.tokenizer.encode(text[offset:])
    while len(ids) < n:
        ids += model.tokenizer.encode(text[: offset])
    return ids[:n]


class AttentionTimer:
    """Sums the wall time spent inside every layer's self_attn (forward hooks)."""

    def __init__(self, model):
        self.total, self._t0 = 0.0, 0.0
        for layer in model.layers:
            layer.self_attn.register_forward_pre_hook(self._start)
            layer.self_attn.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t0 = clock()

    def _stop(self, *_):
        self.total += clock() - self._t0

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


@torch.inference_mode()
def time_prefill(model, timer, ids: list[int]) -> tuple[dict, list, torch.Tensor]:
    cache = model.make_cache()
    timer.take()
    t0 = clock()
    logits = prefill(model, torch.tensor([ids]), cache)
    seconds = clock() - t0
    row = {"prefill_s": seconds, "prefill_attn_s_per_layer": timer.take() / len(model.layers)}
    return row, cache, logits.argmax(-1, keepdim=True)


@torch.inference_mode()
def time_decode(model, timer, cache: list, token: torch.Tensor, num_tokens: int) -> dict:
    """Greedy decode from a prefilled cache, put back as it was after each pass: through the C++
    decode step (end to end: what `generate` runs; then again reading the step's own attention
    timer: kernel pooling, block selection and softmax(qK)V, no projections) and through the
    module path, whose self_attn hooks time the attention layer (projections, RoPE, SDPA or the
    sparse executor)."""
    row = {}
    for fast in (True, False):
        model.fast_decode = fast
        states = [c.snapshot() for c in cache]
        steps, attn, attn_cpp, tok = [], [], [], token
        timer.take()
        for _ in range(num_tokens + 1):  # the first step is a warm-up
            t0 = clock()
            tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
            steps.append(clock() - t0)
            attn.append(timer.take())
        for c, s in zip(cache, states):
            c.restore(s)
        if fast:
            row["decode_ms"] = 1e3 * statistics.median(steps[1:])
            decoder = fast_step._DECODERS[model][1]  # built by the steps above
            decoder.take_attention_seconds()
            tok = token
            for _ in range(num_tokens):
                tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
                attn_cpp.append(decoder.take_attention_seconds())
            for c, s in zip(cache, states):
                c.restore(s)
            row["decode_attn_cpp_ms_per_layer"] = 1e3 * statistics.median(attn_cpp) / len(model.layers)
        else:
            row["decode_module_ms"] = 1e3 * statistics.median(steps[1:])
            row["decode_attn_ms_per_layer"] = 1e3 * statistics.median(attn[1:]) / len(model.layers)
            row["decode_attn_min_ms"] = 1e3 * min(attn[1:]) / len(model.layers)
    model.fast_decode = True
    return row


@torch.inference_mode()
def time_last_chunk(model, timer, cache: list, ids: list[int], repeat: int = 3, chunk: int = 512) -> dict:
    """Attention time of re-running the prompt's last 512-token prefill chunk (trim, refeed): the
    minimum over `repeat` runs, which a busy shared machine disturbs far less than one long prefill."""
    times = []
    for _ in range(repeat):
        for c in cache:
            c.trim(chunk)
        timer.take()
        model(torch.tensor([ids[-chunk:]]), cache, num_logits=1)
        times.append(timer.take())
    return {"chunk_attn_min_ms": 1e3 * min(times) / len(model.layers)}


MODES = (("dense", None), ("sparse", SPEED_SPARSE))


def measure_length(model, timer, length: int, args) -> dict:
    """Prefill in both modes (dense skipped above --max-dense-prefill), then decode in both modes
    from the same prefilled cache (a sparse cache: dense layers simply ignore its kernels)."""
    ids, rows = text_tokens(model, length), {mode: {} for mode, _ in MODES}
    for mode, cfg in MODES:
        if cfg is None and length > args.max_dense_prefill:
            continue
        model.set_sparse_attention(cfg)
        rows[mode], cache, token = time_prefill(model, timer, ids)
    model.set_sparse_attention(SPEED_SPARSE)  # keep the last cache; make sure it holds kernels
    for mode, cfg in MODES:
        model.set_sparse_attention(cfg)
        rows[mode].update(time_decode(model, timer, cache, token, args.decode_tokens))
        rows[mode].update(time_last_chunk(model, timer, cache, ids))
        rows[mode]["cache_mb"] = sum(c.nbytes for c in cache) / 2**20
    return rows


def fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "—"


def ratio(d: dict, s: dict, key: str) -> str:
    return f"{d[key] / s[key]:.2f}x" if key in d and key in s else "—"


def speed(args) -> None:
    model = load_model(args.layers, args.random)
    timer = AttentionTimer(model)
    weights = "random" if args.random else "SmolLM2-135M-Instruct"
    print(f"# speed: {weights} weights, {len(model.layers)} layers, {torch.get_num_threads()} threads, "
          f"{'CPU' if clock is time.process_time else 'wall'} time")
    print(f"# sparse = {SPEED_SPARSE}")
    print("| tokens | mode | prefill s | prefill tok/s | attn prefill s/layer | decode ms/tok (C++ step) "
          "| decode ms/tok (module path) | attn decode ms/tok/layer | min: attn decode ms/layer | C++ step attn ms/tok/layer "
          "| min: attn last 512-chunk ms/layer | cache MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        rows = measure_length(model, timer, length, args)
        for mode, r in rows.items():
            tok_s = f"{length / r['prefill_s']:.0f}" if "prefill_s" in r else "—"
            print(f"| {length} | {mode} | {fmt(r, 'prefill_s', '.1f')} | {tok_s} "
                  f"| {fmt(r, 'prefill_attn_s_per_layer', '.2f')} | {r['decode_ms']:.1f} | {r['decode_module_ms']:.1f} "
                  f"| {r['decode_attn_ms_per_layer']:.2f} | {r['decode_attn_min_ms']:.2f} | {r['decode_attn_cpp_ms_per_layer']:.3f} "
                  f"| {r['chunk_attn_min_ms']:.0f} | {r['cache_mb']:.0f} |")
        d, s = rows["dense"], rows["sparse"]
        print(f"| {length} | dense/sparse | {ratio(d, s, 'prefill_s')} | "
              f"| {ratio(d, s, 'prefill_attn_s_per_layer')} | {ratio(d, s, 'decode_ms')} | {ratio(d, s, 'decode_module_ms')} "
              f"| {ratio(d, s, 'decode_attn_ms_per_layer')} | {ratio(d, s, 'decode_attn_min_ms')} "
              f"| {ratio(d, s, 'decode_attn_cpp_ms_per_layer')} "
              f"| {ratio(d, s, 'chunk_attn_min_ms')} | |", flush=True)


def quality(args) -> None:
    from edgelm.eval.passkey import accuracy_table, run_passkey
    from edgelm.eval.ppl import perplexity

    model = load_model(None, False, context=8192)
    sparse = SparseConfig.parse(args.sparse) if args.sparse else QUALITY_SPARSE
    print(f"# quality ({args.quality}): SmolLM2-135M-Instruct, 30 layers; sparse = {sparse}")
    if args.quality == "ppl":
        print("| ctx | mode | ppl | tokens scored | windows | s |\n|---|---|---|---|---|---|")
    for mode, cfg in (("dense", None), ("sparse", sparse)):
        if mode not in args.modes:
            continue
        model.set_sparse_attention(cfg)
        t0 = clock()
        if args.quality == "passkey":
            results = run_passkey(model, args.lengths, args.depths, trials=args.trials)
            print(f"\n{mode} ({clock() - t0:.0f} s)\n{accuracy_table(results)}")
            for r in results:
                print(f"  {r.length} depth {r.depth:g}: {r.key} -> {r.answer!r}")
            continue
        for ctx in args.lengths:
            r = perplexity(model, text_tokens(model, ctx + (args.windows - 1) * ctx // 2), ctx)
            print(f"| {ctx} | {mode} | {r.ppl:.3f} | {r.tokens} | {r.windows} | {r.seconds:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384,32768")
    p.add_argument("--layers", type=int, default=1, help="speed: first N layers of SmolLM2")
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--max-dense-prefill", type=int, default=32768, help="skip dense prefill above this")
    p.add_argument("--random", action="store_true", help="speed: random weights of SmolLM2's shape")
    p.add_argument("--quality", choices=["passkey", "ppl"], default=None)
    p.add_argument("--trials", type=int, default=1, help="passkey: keys per length and depth")
    p.add_argument("--windows", type=int, default=1, help="ppl: windows per length (stride ctx/2)")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="passkey: comma list")
    p.add_argument("--modes", default="dense,sparse", help="quality: which of dense,sparse to run")
    p.add_argument("--sparse", default=None, help="quality: sparse settings, e.g. 'window=512,topk=32,dense_len=2048' "
                   "(default: the speed settings, window 512, top-24, dense_len 2048)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time (all threads)")
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.depths = [float(x) for x in args.depths.split(",")]
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    configure_runtime()  # flush denormals: SDPA decode is ~100x slower on subnormals
    torch.set_num_threads(args.threads)
    quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    main()
