"""Quality evaluations: pass-key retrieval and long-context perplexity (`edgelm eval ...`)."""

from edgelm.eval.passkey import run_passkey
from edgelm.eval.ppl import perplexity

__all__ = ["perplexity", "run_passkey"]
