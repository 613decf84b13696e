"""Command-line pieces for speculative decoding, for `edgelm.cli` to mount:

    edgelm generate|bench ... --speculative {draft,self-quant,layer-skip,ngram}
                        [--draft-model PATH] [--draft-layers N] [--draft-quant int4|int8]
                        [--num-draft K] [--frspec FILE [--frspec-size V]]
                        [--tree B1,B2,... [--tree-below P]]
    edgelm frspec build --model PATH --text FILE --sizes 8192,16384,32768 --out FILE

Only argparse is imported here; torch and the models load when a command runs.
"""

import argparse
import sys

KINDS = ("draft", "self-quant", "layer-skip", "ngram")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "speculative decoding (same output as plain decoding, faster when drafts are accepted)"
    )
    g.add_argument(
        "--speculative",
        choices=KINDS,
        default=None,
        help="draft: a smaller model (--draft-model); self-quant: an int4/int8 copy of the target; "
        "layer-skip: the target's first layers; ngram: copy n-grams from the context (prompt lookup)",
    )
    g.add_argument("--draft-model", default=None, help="draft model with the same tokenizer (--speculative draft)")
    g.add_argument(
        "--draft-layers", type=int, default=None, help="layers the layer-skip draft keeps (default: half)"
    )
    g.add_argument(
        "--draft-quant", choices=["int4", "int8"], default="int4", help="the self-quant draft's weights"
    )
    g.add_argument(
        "--num-draft", type=int, default=4, help="most draft tokens per verify step (adaptive below it)"
    )
    g.add_argument(
        "--tree",
        default=None,
        help="tree drafting, verified in one forward: model drafts keep their top B1 tokens at depth 1, "
        "B2 at depth 2, ... (e.g. 2,2); --speculative ngram merges up to B1 continuations into a trie",
    )
    g.add_argument(
        "--tree-below",
        type=float,
        default=0.8,
        help="model tree drafts branch only where the draft's top token has probability below this "
        "(1 = always; measured best on SmolLM2: 0.8)",
    )
    g.add_argument("--frspec", default=None, help="FR-Spec ranking file: model drafts score only its top ids")
    g.add_argument(
        "--frspec-size", type=int, default=None, help="which size in the FR-Spec file (default: largest)"
    )


def check_speculative_args(args) -> None:
    """ValueError for flag combinations that cannot mean what the user wants."""
    kind = args.speculative
    if args.num_draft <= 0:
        raise ValueError(f"--num-draft must be positive, got {args.num_draft}")
    if (args.draft_model is not None) != (kind == "draft"):
        raise ValueError("--speculative draft and --draft-model PATH go together")
    if args.draft_layers is not None and kind != "layer-skip":
        raise ValueError("--draft-layers applies to --speculative layer-skip")
    if args.frspec is not None and kind in (None, "ngram"):
        raise ValueError("--frspec applies to model drafts: --speculative draft, self-quant or layer-skip")
    if args.frspec_size is not None and args.frspec is None:
        raise ValueError("--frspec-size needs --frspec FILE")
    tree_branches(args)


def tree_branches(args) -> tuple[int, ...]:
    """--tree B1,B2,... as a tuple (empty: chain drafts); ValueError unless positive integers."""
    tree = getattr(args, "tree", None)
    if tree is None:
        return ()
    try:
        branches = tuple(int(b) for b in str(tree).split(","))
    except ValueError:
        branches = ()
    if not branches or any(b < 1 for b in branches):
        raise ValueError(f"--tree takes positive integers such as 2,2 (top tokens per depth), got {tree!r}")
    if args.speculative is None:
        raise ValueError("--tree applies to --speculative drafting")
    if not 0 < args.tree_below <= 1:
        raise ValueError(f"--tree-below must be in (0, 1], got {args.tree_below}")
    return branches


def proposer_from_args(args, model):
    """The proposer the flags ask for, or None for plain decoding."""
    from edgelm.speculative import DraftModelProposer, LayerSkipProposer, NgramProposer

    check_speculative_args(args)
    kind = args.speculative
    if kind is None:
        return None
    branches = tree_branches(args)
    if kind == "ngram":
        return NgramProposer(branches=branches[0] if branches else 1)
    ids = frspec_ids_from_args(args, model)
    if kind == "layer-skip":
        num_layers = args.draft_layers if args.draft_layers is not None else max(1, len(model.layers) // 2)
        return LayerSkipProposer(model, num_layers, ids, branches=branches, confident=args.tree_below)
    return DraftModelProposer(draft_model_from_args(args, model), ids, branches=branches, confident=args.tree_below)


def draft_model_from_args(args, model):
    if args.speculative == "self-quant":
        return self_quant_draft(model, args.draft_quant)
    from edgelm.hub import resolve_model
    from edgelm.loader import load

    return load(resolve_model(args.draft_model), dtype=model.dtype)


def self_quant_draft(model, method: str, group_size: int = 32):
    """A weight-only quantized copy of the target (its decoder linears and LM head; the layers whose
    shapes the kernels cannot take stay dense)."""
    import copy

    from torch import nn

    from edgelm.quant.quantize import can_quantize, is_default_target, quantize_model

    def predicate(path, m) -> bool:
        return is_default_target(path, m) and can_quantize(m, method, group_size)

    dense = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and predicate(p, m)]
    if not dense:
        raise ValueError(
            f"--speculative self-quant: the target has no dense linear layer that {method} can hold "
            "(already quantized?); load it dense (--quant dequantize) or use another proposer"
        )
    return quantize_model(copy.deepcopy(model), method, group_size, predicate=predicate)


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
    knobs = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}  # defaults: greedy (bench)
    sampling = SamplingParams(*(getattr(args, k, v) for k, v in knobs.items()), gen)
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


def stats_line(stats) -> str:
    """One line for stderr after a speculative generation."""
    return (
        f"[speculative: {stats.num_steps} verify steps, {stats.num_accepted}/{stats.num_proposed} drafts "
        f"accepted ({stats.acceptance_rate:.0%}), mean accepted length {stats.mean_accepted_length:.2f} "
        "tokens per target forward]"
    )
