"""RL on small models: chunk-wise rollout over the batched engine (rollout.py), and a GRPO loop
that uses it (grpo.py). Import from the submodules; this package import stays light for the CLI."""
