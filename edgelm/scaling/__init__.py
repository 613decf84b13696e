"""ModelTunnel-style scaling fits: L(N, D) power laws and a loss -> score sigmoid (see fit.py)."""

from edgelm.scaling.fit import fit_loss_law, fit_runs, fit_sigmoid, loss_law, read_runs, sigmoid_score

__all__ = ["fit_loss_law", "fit_runs", "fit_sigmoid", "loss_law", "read_runs", "sigmoid_score"]
