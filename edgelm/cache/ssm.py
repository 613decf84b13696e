"""The state of one Mamba-2 layer: a fixed-size summary of everything seen so far.

Unlike a KV cache it does not grow with the context and cannot forget its last tokens: the
recurrence h_t = exp(dt_t·A)·h_{t-1} + ... is not invertible in practice, so `trim` refuses and
speculative decoding rolls back with `snapshot()` / `restore()` instead.
"""

import torch


class MambaCache:
    """conv_state (B, C, K-1): the last K-1 conv inputs; ssm_state (B, H, P, N) fp32.

    The tensors are never modified in place (`update` replaces them), so `snapshot()` keeps
    references and costs nothing; restoring is as cheap.
    """

    def __init__(self, left_pad: torch.Tensor | None = None):
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None
        self.offset = 0
        self.left_pad = left_pad

    def update(self, conv_state: torch.Tensor, ssm_state: torch.Tensor, num_tokens: int) -> None:
        """Record the states after `num_tokens` more tokens (prefill chunk or one decode step)."""
        self.conv_state, self.ssm_state = conv_state, ssm_state
        self.offset += num_tokens

    def trim(self, n: int) -> int:
        if n <= 0:
            return 0
        raise ValueError(
            f"cannot trim {n} tokens from a Mamba state: a recurrent state has no per-token history. "
            "Take cache.snapshot() before speculating and cache.restore(state) to roll back."
        )

    def snapshot(self):
        return self.offset, self.conv_state, self.ssm_state

    def restore(self, state) -> None:
        self.offset, self.conv_state, self.ssm_state = state

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.conv_state, self.ssm_state) if t is not None)
