"""`edgelm <command>`: one dispatcher, one small function per subcommand."""

import argparse
import json
import sys

from edgelm.speculative.cli import add_frspec_parser, add_speculative_args, cmd_frspec

DEFAULT_MODEL = "default"  # SmolLM2-135M-Instruct Q4_1, see edgelm.hub


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, .gguf, llama2.c .bin, or 'default'")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/folder if not beside the model")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--quant", choices=["auto", "dequantize", "int8", "int4"], default="auto",
        help="auto: run the file's own (GGUF) quantization as is; dequantize: dense weights; "
        "int8/int4: quantize the dense weights at load (weight-only)",
    )
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgelm", description="Fast small language models on your device.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text and timings")
    add_sparse_args(gen)
    add_speculative_args(gen)
    add_backend_arg(gen)
    chat = sub.add_parser("chat", help="interactive chat (streaming)")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    b = sub.add_parser("bench", help="median prefill/decode speed, memory and roofline")
    add_model_args(b)
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=256)
    b.add_argument("--repeat", type=int, default=5, help="timed runs (0: memory only, with --context)")
    b.add_argument("--context", type=int, default=None,
                   help="also measure the cache memory really allocated at this context vs a dense model")
    b.add_argument("--batch", type=int, default=1, help="sequences for the --context memory measurement")
    b.add_argument("--json", action="store_true")
    add_sparse_args(b)
    add_speculative_args(b)
    add_backend_arg(b)
    prof = sub.add_parser("profile", help="sweep prompt lengths, back-ends, quantizations; report + plots")
    prof.add_argument("--model", default=DEFAULT_MODEL)
    prof.add_argument("--backend", default="native", help="comma list: native,llama.cpp,transformers")
    prof.add_argument("--quant", default="fp32", help="comma list: fp32,bf16,int8,int4,gguf")
    prof.add_argument("--prompt-lengths", default="16,64,256,1024", help="comma list of prompt tokens")
    prof.add_argument("--gen-tokens", type=int, default=32)
    prof.add_argument("--threads", default="2", help="comma list of thread counts")
    prof.add_argument("--quick", action="store_true", help="prompt lengths 16,128 and 8 generated tokens")
    prof.add_argument("--out", default="profile-out", help="folder for profile.json/.md and PNGs")
    ins = sub.add_parser("inspect", help="show a model's config, parameter count and weight types")
    add_model_args(ins)
    ins.add_argument("--context", type=int, default=None, help="predict memory at this context")
    ins.add_argument("--batch", type=int, default=1, help="predict memory for this many sequences")
    ins.add_argument("--json", action="store_true")
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together")
    srv.add_argument("--max-cache-mb", type=int, default=1024, help="KV cache budget in MiB")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    add_eval_parser(sub)
    add_training_parsers(sub)
    add_quantize_parser(sub)
    add_convert_parser(sub)
    add_frspec_parser(sub)
    add_qat_parser(sub)
    return parser


def add_qat_parser(sub) -> None:
    q = sub.add_parser("qat", help="ternary (BitCPM) quantization-aware training from a full-precision model")
    q.add_argument("--model", required=True, help="HF folder, .gguf or llama2.c .bin (the fp starting point)")
    q.add_argument("--ternary", action="store_true", required=True, help="ternary weights (the only QAT target)")
    q.add_argument("--text", required=True, help="training text (its first 2 MB are used)")
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (re-warmed from 0)")
    q.add_argument("--warmup", type=int, default=20, help="re-warm steps")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--group-size", type=int, default=32, help="ternary scale group (32 in BitCPM)")
    q.add_argument("--distill", action="store_true", help="add KL(teacher || student), teacher = the fp model")
    q.add_argument("--ckpt-every", type=int, default=0, help="save the latent weights every N steps")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--out", required=True, help="output folder (load() runs it with packed BitLinear)")


def cmd_qat(args) -> None:
    from edgelm.config import set_threads
    from edgelm.hub import resolve_model
    from edgelm.quant.qat import QATConfig, run_qat

    set_threads(args.threads)
    cfg = QATConfig(args.steps, args.lr, args.warmup, args.batch_size, args.seq_len, args.distill,
                    args.group_size, args.ckpt_every, args.seed)
    info = run_qat(str(resolve_model(args.model)), args.text, cfg, args.out)
    print(f"{args.out}: {args.steps} steps, {info['tokens']} tokens, {info['train_s']} s, "
          f"cross-entropy {info['first_ce']:.3f} -> {info['last_ce']:.3f}")


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["native", "llama.cpp", "transformers"], default="native",
                   help="executor: edgelm itself, llama.cpp (GGUF; pip install 'edgelm[peers]') or transformers")


def executor_from_args(args):
    """(model-like object with .tokenizer, step_fn) for a non-native --backend."""
    from edgelm.backends import executor_step_fn
    from edgelm.hub import resolve_model
    from edgelm.profiler.profile import make_executor

    if getattr(args, "sparse_attention", None) or getattr(args, "speculative", None):
        raise ValueError(f"--sparse-attention and --speculative run on the native back-end only, not {args.backend}")
    quant = {"auto": "gguf", "dequantize": "fp32"}.get(getattr(args, "quant", "auto"), args.quant)
    ex = make_executor(args.backend, str(resolve_model(args.model)), quant, args.threads)
    return ex, executor_step_fn(ex)


def add_quantize_parser(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model's weights and save a folder `load` runs directly")
    q.add_argument("--model", required=True, help="HF folder, .gguf or llama2.c .bin")
    q.add_argument("--method", choices=["int8", "int4", "gptq", "p-gptq", "ternary"], default="int4",
                   help="ternary: post-training BitCPM ternarization of the decoder linears (int8 LM head); "
                        "`edgelm qat --ternary` trains it")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4, help="gptq/p-gptq bits")
    q.add_argument("--group-size", type=int, default=32, help="int4 / ternary group size (32, 64, 128)")
    q.add_argument("--symmetric", action="store_true", help="int4 without zero points")
    q.add_argument("--calib", default=None, help="gptq: calibration text file")
    q.add_argument("--samples", type=int, default=128, help="gptq: calibration sequences")
    q.add_argument("--seq-len", type=int, default=512, help="gptq: tokens per calibration sequence")
    q.add_argument("--prefix-skip", type=int, default=4, help="p-gptq: first positions left out of H")
    q.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing H diagonal")
    q.add_argument("--mse", action="store_true", help="gptq: int4 group ranges by clip search (min weighted error)")
    q.add_argument("--head-bits", type=int, choices=[4, 8], default=None, help="gptq: LM head bits (default --bits)")
    q.add_argument("--head-gptq", action="store_true", help="gptq: GPTQ the LM head too (default: round to nearest)")
    q.add_argument("--true-sequential", action="store_true",
                   help="gptq: within a layer, each input group's H after the groups before it are quantized")
    q.add_argument("--int8-layers", type=lambda v: [int(i) for i in v.split(",")], default=None,
                   help="gptq: comma-separated decoder layer indices quantized to int8 instead (a mixed model)")
    q.add_argument("--prefix-weight", type=float, default=0.0,
                   help="p-gptq: keep the first --prefix-skip positions in H at this weight (0: leave them out)")
    q.add_argument("--prefix-spike", type=float, default=None,
                   help="p-gptq: skip (or down-weight) them only in linears whose max |x| over them is > this x the rest's")
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--out", required=True, help="output folder")


def add_convert_parser(sub) -> None:
    c = sub.add_parser("convert", help="export a model (e.g. a GGUF) as a dense Hugging Face folder")
    c.add_argument("--model", required=True)
    c.add_argument("--to", choices=["hf"], default="hf")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    c.add_argument("--out", required=True, help="output folder")


def add_sparse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sparse-attention",
        "--sparse",
        dest="sparse_attention",
        default=None,
        metavar="SPEC",
        help="InfLLM v2 block-sparse attention, e.g. block=64,topk=16,window=512,dense_len=1024 "
        "(also kernel, stride, init, chunk; 'default' = MiniCPM4's settings)",
    )


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="quality: pass-key retrieval, long-context perplexity")
    kinds = ev.add_subparsers(dest="eval_command", required=True)
    pk = kinds.add_parser("passkey", help="pass-key retrieval accuracy at several lengths and depths")
    add_model_args(pk)
    add_sparse_args(pk)
    pk.add_argument("--lengths", default="2048,4096,8192", help="comma list of prompt tokens")
    pk.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="comma list, 0 = start of the text")
    pk.add_argument("--trials", type=int, default=1, help="random keys per length and depth")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--json", action="store_true")
    ppl = kinds.add_parser("ppl", help="sliding-window perplexity of a long text")
    add_model_args(ppl)
    add_sparse_args(ppl)
    ppl.add_argument("--text", required=True, help="a text file")
    ppl.add_argument("--ctx", type=int, required=True, help="window length in tokens")
    ppl.add_argument("--stride", type=int, default=None, help="default ctx/2 (a window scores its last stride)")
    ppl.add_argument("--max-windows", type=int, default=None)
    ppl.add_argument("--text-offset", type=int, default=0, help="skip this many characters first")
    ppl.add_argument("--json", action="store_true")
    add_compare_parser(kinds)


def add_compare_parser(kinds) -> None:
    cmp = kinds.add_parser("compare", help="several checkpoints on the same text: PPL, Δ%%, KL and top-1 vs the first")
    cmp.add_argument("--models", required=True, help="comma list of checkpoints; the first is the reference")
    cmp.add_argument("--text", required=True, help="a text file")
    cmp.add_argument("--ctx", type=int, default=512, help="window length in tokens (windows do not overlap)")
    cmp.add_argument("--max-windows", type=int, default=None)
    cmp.add_argument("--text-offset", type=int, default=0, help="skip this many characters first (negative: from the end)")
    cmp.add_argument("--threads", type=int, default=None)
    cmp.add_argument("--json", action="store_true")


def load_from_args(args):
    import torch

    from edgelm.config import set_threads
    from edgelm.hub import resolve_model
    from edgelm.loader import load

    set_threads(args.threads)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    sparse = sparse_config_from_args(args)
    quant = getattr(args, "quant", "auto")
    model = load(resolve_model(args.model), dtype=dtype, tokenizer_path=args.tokenizer, dequantize=quant != "auto",
                 quantize=quant if quant in ("int8", "int4") else None, group_size=getattr(args, "group_size", 32))
    return model.set_sparse_attention(sparse) if sparse is not None else model


def cmd_quantize(args) -> None:
    import time
    from pathlib import Path

    import torch

    from edgelm.config import set_threads
    from edgelm.convert import save_quantized
    from edgelm.hub import resolve_model
    from edgelm.loader import load
    from edgelm.quant.quantize import quantize_decoder

    set_threads(args.threads)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise ValueError(f"{args.out}: exists and is not empty; choose a new --out folder")
    t0 = time.perf_counter()
    model = load(resolve_model(args.model), dtype=torch.float32, fuse=False, dequantize=True)
    if args.method in ("gptq", "p-gptq"):
        from edgelm.quant.gptq import gptq_quantize_from_args

        gptq_quantize_from_args(model, args)
    elif args.method == "ternary":
        from edgelm.quant.ternary import ternarize_decoder

        ternarize_decoder(model, args.group_size)
    else:
        quantize_decoder(model, args.method, args.group_size)
    out = save_quantized(model, args.out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {args.method}, {size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")


def cmd_convert(args) -> None:
    from edgelm.convert import export_hf
    from edgelm.hub import resolve_model
    from edgelm.loader import load

    import torch

    dtype = getattr(torch, args.dtype)
    model = load(resolve_model(args.model), dtype=torch.float32, fuse=False, dequantize=True)
    out = export_hf(model, args.out, dtype)
    print(f"{out}: Hugging Face folder, {args.dtype}")


def sparse_config_from_args(args):
    from edgelm.layers.sparse_attention import SparseConfig

    spec = getattr(args, "sparse_attention", None)
    return None if spec is None else SparseConfig.parse(spec)


def sampling_from_args(args) -> dict:
    import torch

    from edgelm.sampling import make_logits_processors, make_sampler

    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    return {
        "max_tokens": args.max_tokens,
        "sampler": make_sampler(args.temperature, args.top_p, args.top_k, args.min_p, gen),
        "logits_processors": make_logits_processors(args.repetition_penalty),
        "stop": args.stop,
    }


def cmd_generate(args) -> None:
    from edgelm.generate import stream_generate
    from edgelm.speculative.cli import check_speculative_args, stats_line, step_fn_from_args

    check_speculative_args(args)  # before the slow model load
    if args.backend != "native":
        model, backend_step = executor_from_args(args)
    else:
        model, backend_step = load_from_args(args), None
    kwargs = sampling_from_args(args)
    step_fn = backend_step or step_fn_from_args(args, model)
    parts, last = [], None
    for last in stream_generate(
        model, args.prompt, chat=args.chat, ignore_eos=args.ignore_eos, step_fn=step_fn, **kwargs
    ):
        parts.append(last.text)
        if not args.json:
            print(last.text, end="", flush=True)
    if args.json:
        result = result_json("".join(parts), last)
        if step_fn is not None and backend_step is None:
            result["speculative"] = speculative_json(step_fn.stats)
        print(json.dumps(result, indent=2))
    else:
        print()
        print(
            f"[{last.prompt_tokens} prompt tokens, {last.generated_tokens} generated; "
            f"prefill {last.prefill_tok_s:.1f} tok/s, decode {last.decode_tok_s:.1f} tok/s, "
            f"peak RSS {last.peak_rss_mb:.0f} MB]",
            file=sys.stderr,
        )
        if getattr(step_fn, "stats", None) is not None:  # speculative decoding's acceptance
            print(stats_line(step_fn.stats), file=sys.stderr)


def speculative_json(stats) -> dict:
    return {
        "verify_steps": stats.num_steps,
        "proposed": stats.num_proposed,
        "accepted": stats.num_accepted,
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "mean_accepted_length": round(stats.mean_accepted_length, 4),
    }


def result_json(text: str, last) -> dict:
    return {
        "text": text,
        "finish_reason": last.finish_reason,
        "prompt_tokens": last.prompt_tokens,
        "generated_tokens": last.generated_tokens,
        "ttft_s": round(last.ttft_s, 6),
        "prefill_tok_s": round(last.prefill_tok_s, 2),
        "decode_tok_s": round(last.decode_tok_s, 2),
        "peak_rss_mb": round(last.peak_rss_mb, 1),
    }


def cmd_chat(args) -> None:
    from edgelm.generate import stream_generate

    model = load_from_args(args)
    kwargs = sampling_from_args(args)
    tok = model.tokenizer
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("edgelm chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        reply = []
        for r in stream_generate(model, ids, **kwargs):
            reply.append(r.text)
            print(r.text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_inspect(args) -> None:
    from pathlib import Path

    from edgelm.hub import resolve_model
    from edgelm.inspect import analyze, analyze_config, read_config_only

    config = read_config_only(Path(resolve_model(args.model)))
    if config is not None:  # architecture only: nothing to download or load
        info = analyze_config(config, context=args.context, batch=args.batch)
    else:
        info = analyze(load_from_args(args), args.context, args.batch)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        print(f"{key:>24}: {value}")


def cmd_bench(args) -> None:
    from tqdm import tqdm

    from edgelm.profiler.bench import bench, bench_speculative, cache_memory
    from edgelm.speculative.cli import check_speculative_args, step_fn_from_args

    check_speculative_args(args)
    if args.repeat < 0 or (args.repeat == 0 and args.context is None):
        raise ValueError("--repeat must be positive (0 only with --context, to measure memory alone)")
    if args.backend != "native":
        ex, step = executor_from_args(args)
        with tqdm(total=args.repeat, desc=f"bench {args.backend}", file=sys.stderr) as bar:
            report = {"model": args.model, "backend": args.backend,
                      **bench(ex, args.prompt_tokens, args.gen_tokens, args.repeat, bar.update, step)}
        print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k:>28}: {v}" for k, v in report.items()))
        return
    model = bench_model_from_args(args)
    report = {"model": model.source, "compute_dtype": str(model.dtype)[6:]}
    if args.context is not None:
        report["cache_memory"] = cache_memory(model, args.context, args.batch)
    if args.repeat:
        with tqdm(total=args.repeat, desc="bench", file=sys.stderr) as bar:
            if args.speculative is None:
                report.update(bench(model, args.prompt_tokens, args.gen_tokens, args.repeat, progress=bar.update))
            else:
                report["speculative"] = args.speculative
                report.update(bench_speculative(model, lambda: step_fn_from_args(args, model),
                                                args.prompt_tokens, args.gen_tokens, args.repeat, bar.update))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key:>28}: {value}")


def bench_model_from_args(args):
    """The model to bench; a config.json alone (no weights) gives random weights of that
    architecture, enough for speed and memory."""
    from pathlib import Path

    from edgelm.hub import resolve_model
    from edgelm.inspect import read_config_only

    config = read_config_only(Path(resolve_model(args.model)))
    if config is None:
        return load_from_args(args)
    from edgelm.config import set_threads
    from edgelm.formats.hf import text_config
    from edgelm.models import build_model
    from edgelm.profiler.bench import randomize_

    set_threads(args.threads)
    model = randomize_(build_model(text_config(config))).eval().requires_grad_(False)
    quant = getattr(args, "quant", "auto")
    if quant in ("int8", "int4"):
        from edgelm.quant.quantize import quantize_decoder, record_quantization

        quantize_decoder(model, quant, args.group_size)
    model.fuse()
    if quant in ("int8", "int4"):
        record_quantization(model, quant, args.group_size)
    model.source = f"{args.model} (random weights)"
    return model


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{what} must be a comma list of integers, got {text!r}") from e
    if not values or min(values) <= 0:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def cmd_profile(args) -> None:
    from pathlib import Path

    from tqdm import tqdm

    from edgelm.hub import resolve_model
    from edgelm.inspect import analyze_config
    from edgelm.loader import read_checkpoint
    from edgelm.profiler.profile import QUICK, Sweep, check_fits, run_sweep, write_report

    path = resolve_model(args.model)
    sweep = Sweep(path, args.backend.split(","), args.quant.split(","),
                  int_list(args.prompt_lengths, "--prompt-lengths"), args.gen_tokens,
                  int_list(args.threads, "--threads"))
    if args.quick:
        sweep.prompt_lengths, sweep.gen_tokens = QUICK["prompt_lengths"], QUICK["gen_tokens"]
    info = analyze_config(read_checkpoint(Path(path))[0])
    check_fits(sweep, info["weight_bytes"], info["kv_bytes_per_token"])
    with tqdm(total=len(sweep.runs()), desc="profile", file=sys.stderr) as bar:
        report = run_sweep(sweep, progress=bar.update)
    for f in write_report(report, Path(args.out)):
        print(f)


def cmd_serve(args) -> None:
    from edgelm.server import require_server_deps, serve

    require_server_deps()  # before the slow model load
    if args.max_batch <= 0 or args.max_cache_mb <= 0:
        raise ValueError("--max-batch and --max-cache-mb must be positive")
    model = load_from_args(args)
    serve(model, args.host, args.port, max_batch=args.max_batch, max_cache_bytes=args.max_cache_mb << 20,
          api_key=args.api_key)


def cmd_eval(args) -> None:
    {"passkey": cmd_eval_passkey, "ppl": cmd_eval_ppl, "compare": cmd_eval_compare}[args.eval_command](args)


def cmd_eval_compare(args) -> None:
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from edgelm.config import set_threads
    from edgelm.eval.compare import compare_models, format_table
    from edgelm.hub import resolve_model
    from edgelm.loader import load

    if not Path(args.text).is_file():
        raise ValueError(f"{args.text}: no such file")
    set_threads(args.threads)
    paths = [p for p in args.models.split(",") if p.strip()]
    models = [(p, load(resolve_model(p), dtype=torch.float32)) for p in paths]
    text = Path(args.text).read_text(errors="replace")[args.text_offset :]
    if args.max_windows:  # tokenize only what the windows need (generously: 10 characters a token)
        text = text[: 10 * args.ctx * args.max_windows + 10]
    rows = compare_models(models, models[0][1].tokenizer.encode(text), args.ctx, args.max_windows)
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else format_table(rows))


def parse_list(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of numbers, got {text!r}") from None


def cmd_eval_passkey(args) -> None:
    from dataclasses import asdict

    from edgelm.eval.passkey import accuracy_table, run_passkey

    lengths, depths = parse_list(args.lengths, int, "--lengths"), parse_list(args.depths, float, "--depths")
    model = load_from_args(args)

    def progress(r) -> None:
        mark = "ok" if r.correct else "MISS"
        print(f"  {r.length} tokens, depth {r.depth:g}: key {r.key} -> {r.answer!r} {mark}", file=sys.stderr)

    results = run_passkey(model, lengths, depths, args.trials, args.seed, progress=progress)
    print(json.dumps([asdict(r) for r in results], indent=2) if args.json else accuracy_table(results))


def cmd_eval_ppl(args) -> None:
    from dataclasses import asdict
    from pathlib import Path

    from edgelm.eval.ppl import perplexity

    if not Path(args.text).is_file():
        raise ValueError(f"{args.text}: no such file")
    model = load_from_args(args)
    text = Path(args.text).read_text(errors="replace")[args.text_offset :]
    if args.max_windows:  # tokenize only what the windows need (generously: 10 characters a token)
        text = text[: 10 * (args.ctx + (args.max_windows - 1) * (args.stride or args.ctx // 2))]
    result = perplexity(model, model.tokenizer.encode(text), args.ctx, args.stride, args.max_windows)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return
    for key, value in asdict(result).items():
        print(f"{key:>10}: {value:.4f}" if isinstance(value, float) else f"{key:>10}: {value}")


def add_training_parsers(sub) -> None:
    """edgelm data | rl | scaling: UltraClean filtering, chunk-wise rollout + GRPO, scaling fits."""
    from edgelm.data.cli import add_data_parser
    from edgelm.rl.cli import add_rl_parser
    from edgelm.scaling.cli import add_scaling_parser

    for add in (add_data_parser, add_rl_parser, add_scaling_parser):
        add(sub)


def cmd_training(args) -> None:
    from edgelm.data.cli import cmd_data
    from edgelm.rl.cli import cmd_rl
    from edgelm.scaling.cli import cmd_scaling

    {"data": cmd_data, "rl": cmd_rl, "scaling": cmd_scaling}[args.command](args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "inspect": cmd_inspect, "bench": cmd_bench, "profile": cmd_profile, "serve": cmd_serve, "eval": cmd_eval,
            "quantize": cmd_quantize, "convert": cmd_convert, "qat": cmd_qat}
COMMANDS.update(dict.fromkeys(("data", "rl", "scaling"), cmd_training))
COMMANDS["frspec"] = cmd_frspec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ValueError as e:
        print(f"edgelm: error: {e}", file=sys.stderr)
        return 2
    return 0
