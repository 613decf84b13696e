"""`edgelm rl rollout|train` (chunk-wise rollout, GRPO)."""

import json
import sys
from pathlib import Path

STORY_PROMPTS = ["Once upon a time", "One day", "Lily and Tom", "The little dog", "There was a big tree"]


def add_rl_parser(sub) -> None:
    from edgelm.cli import add_model_args

    rl = sub.add_parser("rl", help="chunk-wise rollout and a small GRPO loop")
    verbs = rl.add_subparsers(dest="rl_command", required=True)
    ro = verbs.add_parser("rollout", help="G samples per prompt in budgeted stages; prints trajectories")
    tr = verbs.add_parser("train", help="GRPO on chunk-wise rollouts with a verifiable reward")
    for p in (ro, tr):
        add_model_args(p)
        p.add_argument(
            "--prompt", action="append", default=None, help="prompt (repeatable; default: story openers)"
        )
        p.add_argument("--num-samples", "-G", type=int, default=4, help="samples per prompt (G)")
        p.add_argument(
            "--budget", type=int, default=None, help="new tokens per trajectory per stage (default: none)"
        )
        p.add_argument("--max-tokens", type=int, default=64)
        p.add_argument("--max-batch", type=int, default=16, help="rollout batch: trajectories per stage")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
    ro.add_argument("--out", default=None, help="write trajectories as JSONL here")
    tr.add_argument("--reward", default="word:Lily", help="word:WORD (contains it) or length:TOKENS")
    tr.add_argument("--steps", type=int, default=20)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--beta", type=float, default=0.04, help="KL-to-reference weight")
    tr.add_argument("--clip", type=float, default=0.2, help="importance-weight clipping epsilon")
    tr.add_argument("--plot", default=None, help="PNG of the reward per step")


def make_rollout(args):
    import torch

    from edgelm.cli import load_from_args
    from edgelm.engine import LLMEngine
    from edgelm.rl.rollout import ChunkedRollout

    if args.budget is not None and args.budget <= 0:
        raise ValueError(f"--budget must be a positive number of tokens, got {args.budget}")
    if args.dtype == "auto":
        args.dtype = "float32"  # training needs fp32 weights
    torch.manual_seed(args.seed)
    model = load_from_args(args)
    engine = LLMEngine(model, max_batch=args.max_batch)
    kw = {
        "budget": args.budget,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    rollout = ChunkedRollout(engine, args.num_samples, **kw)
    prompts = [model.tokenizer.encode(p) for p in (args.prompt or STORY_PROMPTS)]
    return model, rollout, prompts


def cmd_rl(args) -> None:
    model, rollout, prompts = make_rollout(args)
    (cmd_rollout if args.rl_command == "rollout" else cmd_train)(args, model, rollout, prompts)


def record(g, t) -> dict:
    chunks = [[c.start, c.end, c.version] for c in t.chunks]  # output tokens [start, end), policy version
    return {
        "group": g.group_id,
        "sample": t.index,
        "text": t.text,
        "finish_reason": t.finish_reason,
        "output_ids": t.output_ids,
        "logprobs": t.logprobs,
        "chunks": chunks,
    }


def cmd_rollout(args, model, rollout, prompts) -> None:
    for p in prompts:
        rollout.add_prompt(p)
    groups = rollout.run()
    s = rollout.stats
    lines = [json.dumps(record(g, t)) + "\n" for g in groups for t in g.samples]
    if args.out:
        Path(args.out).write_text("".join(lines))
    else:
        sys.stdout.writelines(lines)
    print(
        f"{s.num_tokens} tokens in {s.num_stages} stages, {s.num_steps} steps, {s.tokens_per_s:.0f} tok/s, "
        f"occupancy {s.occupancy:.2f}",
        file=sys.stderr,
    )


def cmd_train(args, model, rollout, prompts) -> None:
    from edgelm.rl.grpo import GRPOTrainer, make_reward, plot_rewards, train_grpo

    trainer = GRPOTrainer(model, make_reward(args.reward), args.lr, args.clip, args.beta)

    def show(log) -> None:
        print(
            f"step {log.step}: {log.num_groups} groups, reward {log.mean_reward:.3f}, loss {log.loss:.4f}, "
            f"policy v{log.policy_version}",
            file=sys.stderr,
        )

    if args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    logs = train_grpo(model, rollout, prompts, trainer, args.steps, progress=show)
    if args.plot:
        plot_rewards(logs, args.plot)
