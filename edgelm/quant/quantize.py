"""`quantize_model`: swap nn.Linear modules for quantized ones, chosen per module path by a
predicate, and record the layout in `model.config.quantization` so a saved checkpoint can be
rebuilt (`restore_quantized_layout`) before its state_dict is loaded.

The record:
    {"method": "int4" | "int8" | "gguf", "group_size": 32, "symmetric": False,
     "modules": {"model.layers.0.self_attn.q_proj": {"bits": 4, "group_size": 32},
                 "lm_head": {"bits": 8},
                 "model.embed_tokens": {"tied_to": "lm_head"},
                 "model.layers.0.block_sparse_moe.input_linear": {"bits": 8, "experts": 32}, ...}}
Per-module entries (not one global method) because GGUF files mix types per tensor. A MoE's
stacked expert weight (`ExpertWeights`, (E, out, in)) is quantized per expert like a linear
(`QuantizedExperts`); its entry is the linear's plus "experts": E.
"""

import torch
from torch import nn

from edgelm.layers.moe import ExpertWeights
from edgelm.quant.linear import (
    QUANTIZED_LINEARS,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedExperts,
    to_quantized,
)
from edgelm.quant.primitives import check_int4_shape, check_int8_shape
from edgelm.quant.ternary import BitLinear

RUNTIME_LINEARS = (*QUANTIZED_LINEARS, BitLinear)  # every module a saved layout can name

METHODS = ("int4", "int8")


def is_default_target(path: str, module: nn.Module) -> bool:
    """Every linear inside the decoder layers, plus the LM head."""
    return path == "lm_head" or ".layers." in f".{path}"


def check_quantizable(module: nn.Linear | ExpertWeights, method: str, group_size: int = 32) -> None:
    """ValueError naming the shape when `method` cannot hold this linear's weight (for stacked
    experts: one expert's weight)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of {METHODS}")
    if method == "int4":
        check_int4_shape(module.out_features, module.in_features, group_size)
    else:
        check_int8_shape(module.out_features, module.in_features)


def can_quantize(module: nn.Module, method: str, group_size: int = 32) -> bool:
    """For predicates: skip the layers whose shapes the kernels cannot take."""
    try:
        check_quantizable(module, method, group_size)
    except ValueError:
        return False
    return True


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def module_spec(module: nn.Module) -> dict:
    """The layout entry of one quantized linear."""
    if isinstance(module, Int4Linear):
        return {"bits": 4, "group_size": module.group_size}
    if isinstance(module, BitLinear):
        return {"bits": 2, "ternary": True, "group_size": module.group_size}
    assert isinstance(module, Int8Linear), type(module)
    return {"bits": 8}


def quantization_layout(model: nn.Module) -> dict[str, dict]:
    """{path: entry} for every quantized module now in `model` (so it follows fusion too)."""
    paths = {id(m): p for p, m in model.named_modules()}
    layout, stacks = {}, ()
    for path, m in model.named_modules():
        if path.startswith(stacks):
            continue  # an expert of a QuantizedExperts: its stack's entry names it
        if isinstance(m, QuantizedExperts):
            layout[path] = {**module_spec(m.experts[0]), "experts": m.num_experts}
            stacks = (*stacks, path + ".")
        elif isinstance(m, RUNTIME_LINEARS):
            layout[path] = module_spec(m)
        elif isinstance(m, QuantizedEmbedding):
            if m.tied and id(m.source) in paths:
                layout[path] = {"tied_to": paths[id(m.source)]}
            else:
                layout[path] = {**module_spec(m.source), "embedding": True}
    return layout


def record_quantization(model: nn.Module, method: str, group_size: int = 32, symmetric: bool | None = False):
    """Write `model.config.quantization`, scanning the model for its quantized modules. Call it
    again after changing the module tree (e.g. `model.fuse()`) to refresh "modules"."""
    model.config.quantization = {
        "method": method,
        "group_size": group_size,
        "symmetric": symmetric,
        "modules": quantization_layout(model),
    }


def tied_embeddings(model: nn.Module, linears: dict[str, nn.Module]) -> dict[str, str]:
    """{embedding path: linear path} for embeddings sharing their weight with one of `linears`."""
    by_weight = {id(m.weight): path for path, m in linears.items() if isinstance(m, nn.Linear)}
    return {
        path: by_weight[id(m.weight)]
        for path, m in model.named_modules()
        if isinstance(m, nn.Embedding) and id(m.weight) in by_weight
    }


def tie_quantized_embeddings(model: nn.Module, ties: dict[str, str], dtype=None) -> None:
    """Point each tied embedding {path: linear path} at its (now quantized) linear."""
    for emb_path, linear_path in ties.items():
        out_dtype = dtype or get_module(model, emb_path).weight.dtype
        table = get_module(model, linear_path)
        set_module(model, emb_path, QuantizedEmbedding(table, tied=True, dtype=out_dtype))


def quantize_model(
    model: nn.Module, method: str = "int4", group_size: int = 32, symmetric: bool = False, predicate=None
) -> nn.Module:
    """Swap every nn.Linear for which `predicate(path, module)` holds (default: the decoder layers'
    linears and the LM head) for an Int4Linear / Int8Linear, in place; returns the model. A MoE's
    stacked expert weights (`ExpertWeights`, also offered to `predicate`; they have nn.Linear's
    in_features / out_features per expert) become a `QuantizedExperts` of the same format.

    A tied input embedding keeps working without an fp32 copy: it becomes a QuantizedEmbedding
    reading rows from the quantized LM head. Shapes are checked before anything is swapped.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of {METHODS}")
    predicate = predicate or is_default_target
    targets = {
        p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, ExpertWeights)) and predicate(p, m)
    }
    if not targets:
        name = type(model).__name__
        raise ValueError(f"quantize_model: no nn.Linear layer of {name} matched the predicate")
    for path, m in targets.items():
        try:
            check_quantizable(m, method, group_size)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    ties = tied_embeddings(model, targets)
    for path, m in targets.items():
        if isinstance(m, ExpertWeights):
            new = QuantizedExperts.from_float(m.weight, method, group_size, symmetric)
        else:
            new = to_quantized(m, method, group_size, symmetric)
        set_module(model, path, new)
    tie_quantized_embeddings(model, ties)
    record_quantization(model, method, group_size, symmetric)
    return model


def quantize_decoder(model: nn.Module, method: str, group_size: int = 32) -> list[str]:
    """`quantize_model` over the decoder linears and LM head, keeping dense (and returning) the
    layers whose shapes the kernels cannot take, with a note on stderr."""
    import sys

    skipped = []

    def predicate(path, m) -> bool:
        ok = can_quantize(m, method, group_size)
        if is_default_target(path, m) and not ok:
            skipped.append(path)
        return is_default_target(path, m) and ok

    quantize_model(model, method, group_size, predicate=predicate)
    if skipped:
        print(f"note: {len(skipped)} layers kept dense (shapes the {method} kernel cannot take): {skipped[:4]}",
              file=sys.stderr)
    return skipped


def restore_quantized_layout(model: nn.Module, quantization: dict) -> nn.Module:
    """Rebuild the module layout a saved `config.quantization` describes, with empty quantized
    modules (on the device of the linears they replace, e.g. meta), ready for
    `model.load_state_dict(state, assign=True)`."""
    modules = quantization["modules"]
    for path, spec in modules.items():
        if "tied_to" not in spec:
            set_module(model, path, _empty_module(get_module(model, path), spec))
    ties = {path: spec["tied_to"] for path, spec in modules.items() if "tied_to" in spec}
    tie_quantized_embeddings(model, ties)
    model.config.quantization = quantization
    return model


def _empty_module(old: nn.Module, spec: dict) -> nn.Module:
    """An uninitialised quantized module shaped like `old` (an nn.Linear, nn.Embedding or
    ExpertWeights)."""
    if "experts" in spec:
        E, N, K = old.weight.shape
        if E != spec["experts"]:
            raise ValueError(f"quantization layout has {spec['experts']} experts, the model {E}")
        with torch.device(old.weight.device):
            return QuantizedExperts.empty(E, N, K, spec["bits"], spec.get("group_size", 32))
    if spec.get("embedding"):
        N, K, has_bias = old.num_embeddings, old.embedding_dim, False
    else:
        N, K, has_bias = old.out_features, old.in_features, old.bias is not None
    with torch.device(old.weight.device):
        if spec.get("ternary"):
            new = BitLinear(K, N, has_bias, spec["group_size"])
        elif spec["bits"] == 4:
            new = Int4Linear(K, N, has_bias, spec["group_size"])
        else:
            new = Int8Linear(K, N, has_bias)
    return QuantizedEmbedding(new, dtype=old.weight.dtype) if spec.get("embedding") else new


def module_nbytes(model: nn.Module) -> int:
    """Resident bytes of a model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, RUNTIME_LINEARS)}
