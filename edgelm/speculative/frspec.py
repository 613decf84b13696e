"""FR-Spec (frequency-ranked speculative sampling; MiniCPM4 report, OpenBMB FR-Spec).

The draft's LM head is the drafting bottleneck for large vocabularies (49K rows x 576 for
SmolLM2 is ~20% of its weights). Count token frequencies on a corpus, keep the top-V ids V_high,
and let the draft score only those LM-head rows; a draft index maps back to a real id through the
ranking. The target still verifies over the full vocabulary, so output stays lossless.

A ranking file is safetensors: one int64 tensor `top_{size}` per size, plus metadata naming the
vocabulary size and a fingerprint of the tokenizer, so a file built for another vocabulary is
refused on load.
"""

import copy
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

FORMAT = "edgelm-frspec-v1"
LINES_PER_CHUNK = 2000  # lines encoded per tokenizer call


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over every token's text: equal only for the same vocabulary with the same ids."""
    h = hashlib.sha256(str(tokenizer.vocab_size).encode())
    for i in range(tokenizer.vocab_size):
        h.update(b"\0" + (tokenizer.id_to_token(i) or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def count_tokens(tokenizer, text_file: str | Path, max_lines: int | None = None) -> torch.Tensor:
    """Token counts (vocab_size,) int64 over the file's lines (the paper uses 1M lines)."""
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    with open(text_file, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()[:max_lines]
    for start in range(0, len(lines), LINES_PER_CHUNK):
        ids = tokenizer.encode("".join(lines[start : start + LINES_PER_CHUNK]), add_special_tokens=False)
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=counts.numel())
    return counts


def rank_ids(counts: torch.Tensor, always: Iterable[int] = ()) -> torch.Tensor:
    """All ids, most frequent first (ties by id); `always` (BOS/EOS: rare in text, vital in
    generation, or the draft could never propose the end of a reply) go first."""
    order = torch.sort(counts, descending=True, stable=True).indices
    first = torch.tensor(sorted(set(always)), dtype=torch.long)
    return torch.cat([first, order[~torch.isin(order, first)]])


def build_frequency_ranking(
    tokenizer, text_file: str | Path, sizes: Sequence[int], max_lines: int | None = None
) -> dict[int, torch.Tensor]:
    """{size: LongTensor (size,) of the most frequent ids} for each size, from one count."""
    check_sizes(sizes, tokenizer.vocab_size)
    always = [
        *tokenizer.eos_token_ids,
        *([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []),
    ]
    ranking = rank_ids(count_tokens(tokenizer, text_file, max_lines), always)
    return {int(s): ranking[:s].clone() for s in sizes}


def check_sizes(sizes: Sequence[int], vocab_size: int) -> None:
    if not sizes:
        raise ValueError("give at least one FR-Spec vocabulary size")
    bad = [s for s in sizes if not 0 < s <= vocab_size]
    if bad:
        raise ValueError(f"FR-Spec sizes {bad} are outside 1..{vocab_size} (the vocabulary size)")


def save_frequency_ranking(path: str | Path, ranking: dict[int, torch.Tensor], tokenizer) -> None:
    from safetensors.torch import save_file

    metadata = {
        "format": FORMAT,
        "vocab_size": str(tokenizer.vocab_size),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }
    save_file({f"top_{s}": ids.contiguous() for s, ids in ranking.items()}, str(path), metadata=metadata)


def load_frequency_ranking(path: str | Path, tokenizer) -> dict[int, torch.Tensor]:
    """Read a ranking file; ValueError if it was built for another vocabulary."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an FR-Spec ranking file (format {meta.get('format')!r})")
        check_vocabulary(meta, tokenizer, path)
        return {int(name.removeprefix("top_")): f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def check_vocabulary(meta: dict, tokenizer, path) -> None:
    if int(meta["vocab_size"]) != tokenizer.vocab_size:
        raise ValueError(
            f"{path} was built for a vocabulary of {meta['vocab_size']} tokens, but this model's has "
            f"{tokenizer.vocab_size}: rebuild it with `edgelm frspec build` for this model"
        )
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"{path} was built for another tokenizer of the same size (fingerprint differs): "
            "rebuild it with `edgelm frspec build` for this model"
        )


def pick_size(ranking: dict[int, torch.Tensor], size: int | None = None) -> torch.Tensor:
    """The ids for `size` (default: the largest in the file)."""
    size = max(ranking) if size is None else size
    if size not in ranking:
        raise ValueError(f"no FR-Spec vocabulary of size {size} in the file; it has {sorted(ranking)}")
    return ranking[size]


def restrict_lm_head(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    """A view of `model` whose LM head keeps only rows `ids`: logits (B, L, len(ids)), index j
    standing for token ids[j]. Every other weight is shared; the model's own `logits()` still
    applies `logits_scaling` / soft-capping, so draft probabilities are the model's, restricted."""
    head = model.lm_head
    ids = torch.as_tensor(ids, dtype=torch.long)
    dense = None if hasattr(head, "out_features") else dense_head(head)  # read back once at most
    rows = head.out_features if dense is None else dense[0].shape[0]
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= rows:
        raise ValueError(f"FR-Spec ids must be in 0..{rows - 1} (the LM head's rows)")
    view = module_view(model)
    view.lm_head = quantized_rows(head, ids)
    if view.lm_head is None:  # a dense (or unknown) head: its float rows, sliced once
        weight, bias = dense or dense_head(head)  # (V, hidden), (V,) or None
        sub = nn.Linear(weight.shape[1], ids.numel(), bias=bias is not None, dtype=weight.dtype)
        sub.weight = nn.Parameter(weight[ids].contiguous(), requires_grad=False)  # (V_high, hidden)
        if bias is not None:
            sub.bias = nn.Parameter(bias[ids].contiguous(), requires_grad=False)
        view.lm_head = sub
    return view


@torch.inference_mode()
def quantized_rows(head: nn.Module, ids: torch.Tensor) -> nn.Module | None:
    """The rows `ids` of an int4/int8 head in its own format (a 4-bit draft's restricted head stays
    4-bit: dequantizing it to fp32 would read 7x the bytes of the full int4 head it replaces), or
    None when the head is not one (or the int4 tile layout cannot hold len(ids) rows)."""
    from edgelm.quant.linear import Int4Linear, Int8Linear
    from edgelm.quant.primitives import INT4_ROW_MULTIPLE

    if isinstance(head, Int8Linear) or (isinstance(head, Int4Linear) and ids.numel() % INT4_ROW_MULTIPLE == 0):
        return head.select_rows(ids)
    return None


@torch.inference_mode()
def dense_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, hidden), bias (V,) or None) of a linear LM head. A quantized head without a
    float `weight` or `dequantize()` (edgelm.quant has one) is read back through its own forward:
    head(I) − head(0) = Wᵀ and head(0) = bias, so any linear module works, whatever its packing."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight, head.bias
    if hasattr(head, "dequantize"):
        return head.dequantize(torch.float32), head.bias
    if not hasattr(head, "in_features"):
        raise ValueError(
            f"FR-Spec needs a linear LM head; {type(head).__name__} has no weight or in_features"
        )
    zero = head(torch.zeros(1, head.in_features)).float()  # (1, V)
    weight = (head(torch.eye(head.in_features)).float() - zero).T.contiguous()  # (V, hidden)
    return weight, zero[0] if zero.any() else None


def module_view(module: nn.Module) -> nn.Module:
    """A shallow copy sharing every parameter and submodule, whose table of submodules can be
    replaced without touching the original (copy.copy alone would share that table)."""
    view = copy.copy(module)
    view._modules = dict(module._modules)
    return view


def parse_sizes(text: str) -> list[int]:
    """'8192,16384' -> [8192, 16384]."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from e


def build_frequency_file(
    model: str | Path,
    text_file: str | Path,
    sizes: Sequence[int] | str,
    out: str | Path,
    max_lines: int | None = None,
    tokenizer_path: str | Path | None = None,
) -> dict[int, torch.Tensor]:
    """`edgelm frspec build --model PATH --text FILE --sizes 8192,16384,32768 --out FILE`:
    reads only the model's tokenizer (no weights), counts, ranks and saves."""
    sizes = parse_sizes(sizes) if isinstance(sizes, str) else list(sizes)
    if not Path(text_file).is_file():
        raise ValueError(f"{text_file}: no such text file")
    tokenizer = load_tokenizer(model, tokenizer_path)
    ranking = build_frequency_ranking(tokenizer, text_file, sizes, max_lines)
    save_frequency_ranking(out, ranking, tokenizer)
    return ranking


def load_tokenizer(model: str | Path, tokenizer_path: str | Path | None = None):
    from edgelm.loader import read_checkpoint, resolve_path
    from edgelm.tokenizer import Tokenizer

    if tokenizer_path is not None:
        p = str(tokenizer_path)
        return Tokenizer.from_llama2c(p) if p.endswith(".bin") else Tokenizer.from_hf_folder(p)
    tokenizer = read_checkpoint(resolve_path(model))[2]
    if tokenizer is None:
        raise ValueError(f"{model}: no tokenizer found beside the model; pass --tokenizer")
    return tokenizer
