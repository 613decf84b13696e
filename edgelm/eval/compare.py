"""`edgelm eval compare`: several checkpoints scored on the same tokens.

For each model: perplexity, its change vs the first model (Δ%), the mean KL divergence
KL(p_first ‖ p_model) of the next-token distributions, and top-1 agreement (the share of
positions whose argmax token equals the first model's). The first model is the reference, e.g.
the full-precision checkpoint, the others its quantized versions. Windows of `ctx` tokens do not
overlap; each scores its ctx next-token predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class CompareRow:
    name: str
    ppl: float
    delta_pct: float  # ppl vs the first model's, in %
    kl: float  # mean KL(first ‖ this) per scored token, nats
    top1: float  # share of positions whose argmax equals the first model's
    tokens: int


@dataclass
class _Sums:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0


@torch.inference_mode()
def compare_models(models: list[tuple[str, object]], ids, ctx: int, max_windows: int | None = None) -> list[CompareRow]:
    """models [(name, model)] all sharing one tokenizer; ids the token ids of the text."""
    if len(models) < 1:
        raise ValueError("eval compare needs at least one model")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    num = (len(ids) - 1) // ctx if ctx > 1 else 0
    if num < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}: use a longer text")
    num = min(num, max_windows) if max_windows else num
    sums = [_Sums() for _ in models]
    for w in range(num):
        window = ids[w * ctx : (w + 1) * ctx + 1]  # ctx inputs and their ctx next tokens
        _score_window(models, window, sums)
    n = num * ctx
    base = math.exp(sums[0].nll / n)
    rows = []
    for (name, _), s in zip(models, sums):
        ppl = math.exp(s.nll / n)
        rows.append(CompareRow(name, ppl, 100 * (ppl / base - 1), s.kl / n, s.agree / n, n))
    return rows


def _score_window(models, window: torch.Tensor, sums: list[_Sums]) -> None:
    x, y = window[None, :-1], window[1:]  # (1, ctx), (ctx,)
    ref = None
    for (_, model), s in zip(models, sums):
        logp = model(x)[0].float().log_softmax(-1)  # (ctx, V)
        s.nll -= float(logp.gather(-1, y[:, None]).sum())
        if ref is None:
            ref = logp
        s.kl += float((ref.exp() * (ref - logp)).sum())
        s.agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())


def format_table(rows: list[CompareRow]) -> str:
    width = max(12, *(len(r.name) for r in rows))
    lines = [f"{'model':<{width}}  {'PPL':>9}  {'Δ% vs 1st':>9}  {'KL vs 1st':>9}  {'top-1 agree':>11}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.ppl:>9.3f}  {r.delta_pct:>+9.2f}  {r.kl:>9.4f}  {100 * r.top1:>10.2f}%")
    lines.append(f"({rows[0].tokens} tokens scored)")
    return "\n".join(lines)
