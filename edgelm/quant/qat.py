"""Ternary quantization-aware training (BitCPM), `edgelm qat --ternary`.

Starts from the trained full-precision checkpoint: every decoder linear becomes a `TernaryLinear`
(latent fp32 weight, ternary forward, straight-through gradient), the learning rate is re-warmed
from 0 (linear warm-up, then cosine to lr/10), and the loss is next-token cross-entropy plus,
with `distill`, KL(teacher ‖ student) against the frozen fp model's next-token distributions.
Only the latent linear weights train; embeddings, norms and the LM head stay frozen (the LM head
is quantized to int8 when the result is saved). Checkpoints of the latent weights (safetensors)
are written to `out/latent/stepN.safetensors` every `ckpt_every` steps (a subfolder: `load(out)`
reads every safetensors file beside config.json), so a run can be inspected or resumed by hand.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.quant.ternary import TERNARY_GROUP, BitLinear, TernaryLinear, finish_ternary, swap_linears

TRAIN_CHARS = 2_000_000  # train on the first 2 MB (the last 1 MB of the text is for evaluation)


@dataclass
class QATConfig:
    steps: int = 200
    lr: float = 3e-4
    warmup: int = 20
    batch_size: int = 4
    seq_len: int = 256
    distill: bool = False
    group_size: int = TERNARY_GROUP
    ckpt_every: int = 0  # 0: no intermediate checkpoints
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"--steps, --batch-size must be >= 1 and --seq-len >= 2 (got {self})")
        if not self.lr > 0 or self.warmup < 0:
            raise ValueError(f"--lr must be > 0 and --warmup >= 0, got {self.lr} and {self.warmup}")


def training_tokens(tokenizer, text_path: str | Path, min_tokens: int) -> torch.Tensor:
    """The first 2 MB of the text as one token stream (1-D LongTensor)."""
    path = Path(text_path)
    if not path.is_file():
        raise ValueError(f"{text_path}: no such training text file")
    ids = torch.as_tensor(tokenizer.encode(path.read_text(errors="replace")[:TRAIN_CHARS]), dtype=torch.long)
    if len(ids) < min_tokens:
        raise ValueError(f"training text {text_path} gives {len(ids)} tokens, fewer than one batch ({min_tokens})")
    return ids


def random_batches(ids: torch.Tensor, cfg: QATConfig):
    """Endless (B, seq_len + 1) windows at random offsets of the stream (seeded)."""
    g = torch.Generator().manual_seed(cfg.seed)
    span = cfg.seq_len + 1
    while True:
        starts = torch.randint(0, len(ids) - span + 1, (cfg.batch_size,), generator=g)
        yield torch.stack([ids[s : s + span] for s in starts.tolist()])


def prepare_qat(model: nn.Module, group_size: int = TERNARY_GROUP, predicate=None) -> list[nn.Parameter]:
    """Swap the decoder linears for TernaryLinear in place; returns the trainable latent weights."""
    model.requires_grad_(False)
    swap_linears(model, lambda m: TernaryLinear.from_linear(m, group_size), predicate, group_size)
    params = []
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            params += [p for p in (m.weight, m.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    return params


def lr_at(step: int, cfg: QATConfig) -> float:
    """Re-warm: linear 0 -> lr over `warmup` steps, then cosine down to lr / 10."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def qat_loss(model, teacher, batch: torch.Tensor, distill: bool) -> tuple[torch.Tensor, float, float]:
    """batch (B, L + 1) -> (loss to minimise, cross-entropy, KL) for one step."""
    x, y = batch[:, :-1], batch[:, 1:]
    logits = model(x)  # (B, L, V)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    if not distill:
        return ce, float(ce.detach()), 0.0
    with torch.no_grad():
        t_logp = teacher(x).log_softmax(-1)
    kl = F.kl_div(logits.log_softmax(-1).flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
    return ce + kl, float(ce.detach()), float(kl.detach())


@torch.no_grad()
def eval_loss(model, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over fixed batches (B, L + 1)."""
    return sum(float(F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())) for b in batches) / len(batches)


def train_qat(model, params, batches, cfg: QATConfig, teacher=None, out: Path | None = None, progress=True) -> list[dict]:
    """Run cfg.steps AdamW steps on `params`; returns the per-step history."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    history = []
    bar = _bar(cfg.steps, progress)
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, ce, kl = qat_loss(model, teacher, next(batches), cfg.distill and teacher is not None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"step": step + 1, "ce": ce, "kl": kl, "lr": opt.param_groups[0]["lr"]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ce=f"{ce:.3f}", kl=f"{kl:.3f}")
        if out is not None and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            save_latent(model, out / "latent" / f"step{step + 1}.safetensors")  # not beside the model
    model.eval()
    return history


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="QAT", unit="step")


def save_latent(model: nn.Module, path: Path) -> None:
    """The latent fp32 weights of the TernaryLinear modules (the trainable state) as safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"{p}.weight": m.weight.detach().contiguous() for p, m in model.named_modules() if isinstance(m, TernaryLinear)}
    save_file(state, str(path))


def finish_qat(model: nn.Module, group_size: int = TERNARY_GROUP, head: str | None = "int8") -> nn.Module:
    """TernaryLinear -> packed BitLinear (same codes and scales as the training forward)."""
    swap_linears(model, lambda m: BitLinear.from_float(m, group_size), lambda p, m: isinstance(m, TernaryLinear), group_size)
    return finish_ternary(model, group_size, head)


def run_qat(model_path: str, text: str, cfg: QATConfig, out: str | Path, progress: bool = True) -> dict:
    """`edgelm qat --ternary`: load, ternary QAT, save a folder `load` runs with BitLinear."""
    from edgelm.convert import save_quantized
    from edgelm.loader import load

    cfg.check()
    out = Path(out)
    if out.exists() and any(p.suffix == ".json" for p in out.iterdir()):
        raise ValueError(f"{out}: already holds a checkpoint; choose a new --out folder")
    torch.manual_seed(cfg.seed)
    model = load(model_path, dtype=torch.float32, fuse=False, dequantize=True)
    teacher = load(model_path, dtype=torch.float32, fuse=True, dequantize=True) if cfg.distill else None
    ids = training_tokens(model.tokenizer, text, cfg.batch_size * (cfg.seq_len + 1))
    params = prepare_qat(model, cfg.group_size)
    if cfg.ckpt_every:  # the latent checkpoints' settings, for whoever evaluates them mid-run
        (out / "latent").mkdir(parents=True, exist_ok=True)
        (out / "latent" / "qat-args.json").write_text(json.dumps(asdict(cfg), indent=1))
    t0 = time.perf_counter()
    history = train_qat(model, params, random_batches(ids, cfg), cfg, teacher, out, progress)
    train_s = time.perf_counter() - t0
    finish_qat(model, cfg.group_size)
    save_quantized(model, out)
    info = {**asdict(cfg), "tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "train_s": round(train_s),
            "first_ce": history[0]["ce"], "last_ce": history[-1]["ce"], "history": history}
    (out / "qat.json").write_text(json.dumps(info, indent=1))
    return info
