"""Latency by operator class from forward hooks: the profiler stays outside the model code.

Each module's *self* time (its wall time minus its children's) is charged to a class chosen from
its type and name: linear layers by role (qkv, o, gate_up, down, lm_head), attention (the part of
an attention block outside its projections: RoPE, cache update, softmax·V), norm, activation (the
part of an MLP outside its projections), embedding, and the model's own glue ("other").
"""

import time
from collections import defaultdict
from contextlib import contextmanager

from torch import nn

LINEAR_ROLES = (
    ("qkv_proj", "qkv"), ("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv"), ("o_proj", "o"),
    ("gate_up_proj", "gate_up"), ("gate_proj", "gate_up"), ("up_proj", "gate_up"), ("down_proj", "down"),
    ("lm_head", "lm_head"), ("router", "moe_routing"), ("in_proj", "ssm_proj"), ("out_proj", "ssm_proj"),
)


def op_class(name: str, module: nn.Module) -> str:
    leaf = name.rsplit(".", 1)[-1]
    kind = type(module).__name__
    if "Linear" in kind or isinstance(module, nn.Linear):
        return next((role for key, role in LINEAR_ROLES if leaf == key), "linear_other")
    if isinstance(module, nn.Embedding) or "Embedding" in kind:
        return "embedding"
    if "Norm" in kind:
        return "norm"
    if "Attention" in kind:
        return "attention"
    if "MLP" in kind:
        return "activation"
    if "Mamba" in kind:
        return "ssm_scan"
    if "MoE" in kind or "Moe" in kind:
        return "moe_routing"
    if kind == "RoPE":
        return "attention"
    return "other"


class OpTimer:
    """Accumulates self time per operator class while installed on a model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, children_time]
        self._handles = []

    def _pre(self, module, args):
        self._stack.append([time.perf_counter(), 0.0])

    def _post_for(self, cls: str):
        def post(module, args, output):
            start, children = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.totals[cls] += elapsed - children
            if self._stack:
                self._stack[-1][1] += elapsed

        return post

    @contextmanager
    def installed(self):
        # Hooks see modules only: the breakdown runs the module path, not the fused C++ decode
        # step (edgelm/kernels/llama.py), which does the same operators in one call.
        fast_before = getattr(self.model, "fast_decode", None)
        self.model.fast_decode = False
        for name, module in self.model.named_modules():
            cls = "other" if module is self.model else op_class(name, module)
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post_for(cls)))
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            if fast_before is None:
                del self.model.fast_decode
            else:
                self.model.fast_decode = fast_before

    def reset(self) -> None:
        self.totals.clear()
