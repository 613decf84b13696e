"""A small GRPO loop on chunk-wise rollouts (`edgelm rl train`).

Per group of G samples of one prompt, advantages are the group-normalised rewards
A_i = (r_i - mean(r)) / (std(r) + eps) (GRPO, DeepSeekMath §4.1). Samples are generated in chunks
by possibly different policy versions, so the importance weight is taken per chunk c, from the
behaviour log-probs recorded at sampling time:

    rho_c = exp(mean_{t in c} (log pi_theta(t) - log pi_behaviour(t)))      (geometric mean over c)
    L_c   = -min(rho_c A, clip(rho_c, 1 - eps, 1 + eps) A)                (PPO clipping, per chunk)

and the loss is the token-weighted mean of L_c plus beta times the k3 estimate of KL(pi_theta ||
pi_ref) per token, exp(ref - theta) - (ref - theta) - 1 (Schulman's unbiased, positive estimator).
"""

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgelm.rl.rollout import Group, Trajectory

Reward = Callable[[str, int], float]  # (completion text, number of tokens) -> reward


def make_reward(spec: str) -> Reward:
    """'word:ball' -> 1 if the completion contains the word; 'length:40' -> 1 - |n - 40| / 40."""
    kind, _, arg = spec.partition(":")
    if kind == "word" and arg.strip():
        pattern = re.compile(rf"\b{re.escape(arg.strip())}\b", re.IGNORECASE)
        return lambda text, n: float(bool(pattern.search(text)))
    if kind == "length" and arg.isdigit() and int(arg) > 0:
        target = int(arg)
        return lambda text, n: max(0.0, 1.0 - abs(n - target) / target)
    raise ValueError(f"unknown reward {spec!r}; use word:WORD or length:TOKENS")


def advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (num_groups, G) -> group-normalised advantages, same shape."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def token_logprobs(model, trajectories: list[Trajectory]) -> torch.Tensor:
    """log pi(output token) for every output token of every trajectory, concatenated (T,)."""
    seqs = [t.prompt_ids + t.output_ids for t in trajectories]
    width = max(map(len, seqs))
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # right pad: causal, harmless
    logp = model(tokens).log_softmax(-1)  # (B, L, V)
    parts = []
    for i, t in enumerate(trajectories):
        a, n = len(t.prompt_ids), len(t.output_ids)
        pos = torch.arange(a - 1, a + n - 1)  # position p predicts token p + 1
        parts.append(logp[i, pos, torch.tensor(t.output_ids)])
    return torch.cat(parts)


def chunk_index(trajectories: list[Trajectory]) -> torch.Tensor:
    """(T,) the global chunk number of each output token (chunks numbered across trajectories)."""
    ids, c = [], 0
    for t in trajectories:
        for chunk in t.chunks:
            ids += [c] * (chunk.end - chunk.start)
            c += 1
    return torch.tensor(ids, dtype=torch.long)


def grpo_loss(new, old, ref, adv, chunk, clip_eps: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """new/old/ref (T,) log-probs under the policy, behaviour and reference; adv (T,) each token's
    sample advantage; chunk (T,) chunk ids. Returns the scalar loss (see the module docstring)."""
    num = int(chunk.max()) + 1
    size = torch.zeros(num).index_add_(0, chunk, torch.ones_like(new)).clamp(min=1)  # (C,)
    mean_ratio = torch.zeros(num).index_add_(0, chunk, new - old) / size  # (C,)
    rho = mean_ratio.exp()
    adv_c = torch.zeros(num).index_add_(0, chunk, adv) / size  # one sample per chunk: its advantage
    surrogate = torch.minimum(rho * adv_c, rho.clamp(1 - clip_eps, 1 + clip_eps) * adv_c)
    policy = -(surrogate * size).sum() / size.sum()
    kl = (ref - new).exp() - (ref - new) - 1
    return policy + beta * kl.mean()


@dataclass
class StepLog:
    step: int
    num_groups: int
    mean_reward: float
    loss: float
    policy_version: int


class GRPOTrainer:
    """Updates `model` in place (the engine the rollout uses holds the same model)."""

    def __init__(self, model, reward: Reward, lr: float = 1e-3, clip_eps: float = 0.2, beta: float = 0.04):
        self.model, self.reward, self.clip_eps, self.beta = model, reward, clip_eps, beta
        self.ref = copy.deepcopy(model).requires_grad_(False)
        model.requires_grad_(True)
        # no weight decay: it would pull the policy away from the reference the KL term anchors it to
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def rewards(self, groups: list[Group]) -> torch.Tensor:
        return torch.tensor([[self.reward(t.text, len(t.output_ids)) for t in g.samples] for g in groups])

    def update(self, groups: list[Group]) -> tuple[float, float]:
        """One gradient step on finished groups; returns (mean reward, loss)."""
        trajs = [t for g in groups for t in g.samples if t.output_ids]
        rewards = self.rewards(groups)
        adv_by_sample = advantages(rewards).flatten().tolist()
        samples = [t for g in groups for t in g.samples]
        adv = torch.cat([torch.full((len(t.output_ids),), a) for t, a in zip(samples, adv_by_sample)])
        old = torch.tensor([lp for t in trajs for lp in t.logprobs])
        with torch.no_grad():
            ref = token_logprobs(self.ref, trajs)
        new = token_logprobs(self.model, trajs)
        loss = grpo_loss(new, old, ref, adv, chunk_index(trajs), self.clip_eps, self.beta)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return rewards.mean().item(), loss.item()


def train_grpo(model, rollout, prompts: list[list[int]], trainer: GRPOTrainer, steps: int, progress=None):
    """`steps` RL steps: top up the rollout with prompts (cycled), run one stage, update on the
    groups it finished (none yet: no update), bump the policy version. Returns a log per step."""
    logs, next_prompt = [], 0
    for step in range(steps):
        while len(rollout.waiting) * rollout.num_samples + len(rollout.parked) < rollout.stage_size:
            rollout.add_prompt(prompts[next_prompt % len(prompts)])
            next_prompt += 1
        groups = rollout.run_stage()
        reward, loss = trainer.update(groups) if groups else (float("nan"), float("nan"))
        rollout.policy_version += bool(groups)
        logs.append(StepLog(step, len(groups), reward, loss, rollout.policy_version))
        if progress is not None:
            progress(logs[-1])
    return logs


def plot_rewards(logs: list[StepLog], path) -> None:
    from edgelm.profiler.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    pts = [(s.step, s.mean_reward) for s in logs if s.num_groups]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.set(xlabel="RL step", ylabel="mean reward of finished groups", title="GRPO on chunk-wise rollouts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
