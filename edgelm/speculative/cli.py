"""Command-line pieces for speculative decoding, for `edgelm.cli` to mount:

    edgelm generate ... --prompt-lookup | --draft-layers N | --draft-model PATH | --self-quant int4
                        [--num-draft K] [--frspec FILE [--frspec-size V]]
    edgelm frspec build --model PATH --text FILE --sizes 8192,16384,32768 --out FILE

Only argparse is imported here; torch and the models load when a command runs.
"""

import argparse
import sys


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "speculative decoding (same output as plain decoding, faster when drafts are accepted)"
    )
    which = g.add_mutually_exclusive_group()
    which.add_argument(
        "--prompt-lookup", action="store_true", help="draft by copying n-grams from the context"
    )
    which.add_argument(
        "--draft-layers", type=int, default=None, help="draft with the target's first N layers"
    )
    which.add_argument("--draft-model", default=None, help="draft model with the same tokenizer")
    which.add_argument(
        "--self-quant", choices=["int4", "int8"], default=None, help="draft with a quantized copy"
    )
    g.add_argument(
        "--num-draft", type=int, default=4, help="most draft tokens per verify step (adaptive below it)"
    )
    g.add_argument("--frspec", default=None, help="FR-Spec ranking file: model drafts score only its top ids")
    g.add_argument(
        "--frspec-size", type=int, default=None, help="which size in the FR-Spec file (default: largest)"
    )


def proposer_from_args(args, model):
    """The proposer the flags ask for, or None for plain decoding."""
    from edgelm.speculative import DraftModelProposer, LayerSkipProposer, NgramProposer

    if args.num_draft <= 0:
        raise ValueError(f"--num-draft must be positive, got {args.num_draft}")
    ids = frspec_ids_from_args(args, model)
    if args.prompt_lookup:
        if ids is not None:
            raise ValueError("--frspec applies to model drafts, not --prompt-lookup")
        return NgramProposer()
    if args.draft_layers is not None:
        return LayerSkipProposer(model, args.draft_layers, ids)
    if args.draft_model is not None or args.self_quant is not None:
        return DraftModelProposer(draft_model_from_args(args, model), ids)
    if ids is not None:
        raise ValueError("--frspec needs a model draft: --draft-layers, --draft-model or --self-quant")
    return None


def draft_model_from_args(args, model):
    if args.self_quant is not None:
        import copy

        from edgelm.quant import quantize_model

        return quantize_model(copy.deepcopy(model), args.self_quant, group_size=32)
    from edgelm.hub import resolve_model
    from edgelm.loader import load

    return load(resolve_model(args.draft_model), dtype=model.dtype)


def frspec_ids_from_args(args, model):
    if args.frspec is None:
        return None
    from edgelm.speculative.frspec import load_frequency_ranking, pick_size

    return pick_size(load_frequency_ranking(args.frspec, model.tokenizer), args.frspec_size)


def step_fn_from_args(args, model):
    """A `generate_step`-compatible function for `stream_generate(step_fn=...)`, or None."""
    import torch

    from edgelm.speculative.acceptance import SamplingParams

    proposer = proposer_from_args(args, model)
    if proposer is None:
        return None
    gen = torch.Generator().manual_seed(args.seed) if getattr(args, "seed", None) is not None else None
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p, gen)
    return make_step_fn(proposer, sampling, args.num_draft)


def make_step_fn(proposer, sampling=None, num_draft: int = 4, adaptive: bool = True):
    """Wrap `speculative_generate_step` in `generate_step`'s signature. Its `sampler` argument is
    ignored: `sampling` (the same settings, as data) decides. Counts land in `.stats`."""
    from edgelm.speculative.generate import SpeculativeStats, speculative_generate_step

    stats = SpeculativeStats()

    def steps(model, prompt, *, sampler=None, logits_processors=(), max_tokens=256, **kwargs):
        return speculative_generate_step(
            model,
            prompt,
            proposer,
            num_draft=num_draft,
            sampling=sampling,
            logits_processors=logits_processors,
            max_tokens=max_tokens,
            adaptive=adaptive,
            stats=stats,
            **kwargs,
        )

    steps.stats = stats
    return steps


def add_frspec_parser(sub) -> None:
    """`edgelm frspec build ...` under the main subparsers."""
    fr = sub.add_parser("frspec", help="FR-Spec token-frequency rankings for speculative drafting")
    verbs = fr.add_subparsers(dest="frspec_command", required=True)
    build = verbs.add_parser("build", help="count token frequencies on a text file and save the top ids")
    build.add_argument("--model", required=True, help="model whose tokenizer to use (weights are not read)")
    build.add_argument("--tokenizer", default=None, help="tokenizer file/folder if not beside the model")
    build.add_argument("--text", required=True, help="text corpus (one document or line per line)")
    build.add_argument("--sizes", default="8192,16384,32768", help="comma-separated vocabulary sizes")
    build.add_argument("--max-lines", type=int, default=None)
    build.add_argument("--out", required=True, help="output .safetensors file")


def cmd_frspec(args) -> None:
    from edgelm.hub import resolve_model
    from edgelm.speculative.frspec import build_frequency_file

    ranking = build_frequency_file(
        resolve_model(args.model), args.text, args.sizes, args.out, args.max_lines, args.tokenizer
    )
    print(f"wrote {args.out}: top-{', top-'.join(str(s) for s in sorted(ranking))} ids", file=sys.stderr)
