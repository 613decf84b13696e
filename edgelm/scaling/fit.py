"""ModelTunnel-style scaling fits (`edgelm scaling fit`): predict a big run from small ones.

1. Loss law (Chinchilla, Hoffmann et al. 2022, eq. 2): L(N, D) = E + A / N^alpha + B / D^beta for N
   parameters and D training tokens. Fitted, as there, in log space with the log-sum-exp form
   log L = LSE(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b, E = e^e), by least squares
   from a grid of starts (the surface has several local minima).
2. Loss -> task score (MiniCPM4's ModelTunnel v2): score = lo + (hi - lo) * sigmoid(-k (L - L0)), a
   sigmoid in the loss, since a benchmark sits at chance until the loss is low enough, then
   saturates.
3. Intervals: refit on bootstrap resamples of the runs (from the full fit's optimum) and take the
   5th/95th percentiles of each prediction: a 90% interval for the fitted curve.
"""

import csv
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LAW = ("E", "A", "alpha", "B", "beta")
SIGMOID = ("lo", "hi", "k", "L0")


def _least_squares():
    try:
        from scipy.optimize import least_squares
    except ImportError as e:
        raise ValueError("scaling fits need scipy: pip install 'edgelm[data]'") from e
    return least_squares


def loss_law(N, D, E, A, alpha, B, beta):
    return E + A / np.power(N, alpha) + B / np.power(D, beta)


def _lse_residual(theta, logN, logD, logL):
    a, alpha, b, beta, e = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    return np.logaddexp.reduce(terms, axis=0) - logL


def _theta_to_law(theta) -> dict:
    a, alpha, b, beta, e = theta
    return {
        "E": float(np.exp(e)),
        "A": float(np.exp(a)),
        "alpha": float(alpha),
        "B": float(np.exp(b)),
        "beta": float(beta),
    }


def _law_to_theta(p: dict) -> np.ndarray:
    return np.array([np.log(p["A"]), p["alpha"], np.log(p["B"]), p["beta"], np.log(p["E"])])


def fit_loss_law(N, D, L, start: dict | None = None) -> dict:
    """Fit E, A, alpha, B, beta to runs (N, D, L): from `start`, or the best of a grid of starts."""
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    check_runs(N, D, L)
    least_squares = _least_squares()
    args = (np.log(N), np.log(D), np.log(L))
    grid = (
        [_law_to_theta(start)]
        if start
        else [np.array(t) for t in itertools.product([0, 6, 12], [0.3], [0, 6, 12], [0.3], [-1, 0.5])]
    )
    bounds = ([-np.inf, 0, -np.inf, 0, -np.inf], [np.inf, 3, np.inf, 3, np.inf])
    fits = [least_squares(_lse_residual, t0, args=args, bounds=bounds, method="trf") for t0 in grid]
    return _theta_to_law(min(fits, key=lambda f: f.cost).x)


def check_runs(N, D, L) -> None:
    if len(N) < len(LAW):
        raise ValueError(f"fitting {len(LAW)} parameters needs at least {len(LAW)} runs, got {len(N)}")
    if not (np.all(N > 0) and np.all(D > 0) and np.all(L > 0)):
        raise ValueError("params, tokens and loss must all be positive")
    if len(set(N)) < 2 or len(set(D)) < 2:
        raise ValueError("the runs must vary both params and tokens to separate their exponents")


def sigmoid_score(L, lo, hi, k, L0):
    return lo + (hi - lo) / (1 + np.exp(k * (np.asarray(L) - L0)))


def fit_sigmoid(L, score, start: dict | None = None) -> dict:
    """Fit score = lo + (hi - lo) * sigmoid(-k (L - L0)) (k > 0: lower loss, higher score)."""
    L, score = np.asarray(L, dtype=float), np.asarray(score, dtype=float)
    if len(L) < len(SIGMOID):
        raise ValueError(f"the sigmoid fit needs at least {len(SIGMOID)} runs with a score, got {len(L)}")
    spread = max(float(np.ptp(L)), 1e-6)
    t0 = [start[n] for n in SIGMOID] if start else [score.min(), score.max(), 4 / spread, float(np.median(L))]
    res = _least_squares()(
        lambda p: sigmoid_score(L, *p) - score, t0, bounds=([-np.inf, -np.inf, 0, -np.inf], np.inf)
    )
    return dict(zip(SIGMOID, map(float, res.x)))


@dataclass
class Run:
    params: float
    tokens: float
    loss: float | None
    score: float | None
    heldout: bool


def read_runs(path: str | Path) -> list[Run]:
    """CSV with columns params, tokens, loss, and optionally score and split (train/heldout)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"params", "tokens", "loss"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))} (need params,tokens,loss)")
    return [_parse_run(r, f"{path}:{i + 2}") for i, r in enumerate(rows)]


def _parse_run(row: dict, where: str) -> Run:
    def num(key):
        value = (row.get(key) or "").strip()
        try:
            return float(value) if value else None
        except ValueError:
            raise ValueError(f"{where}: {key} {value!r} is not a number") from None

    if num("params") is None or num("tokens") is None:
        raise ValueError(f"{where}: params and tokens are required")
    split = (row.get("split") or "train").strip().lower()
    if split not in ("train", "heldout"):
        raise ValueError(f"{where}: split must be train or heldout, got {split!r}")
    return Run(num("params"), num("tokens"), num("loss"), num("score"), split == "heldout")


@dataclass
class Prediction:
    params: float
    tokens: float
    loss: float  # predicted
    loss_lo: float  # 90% bootstrap interval
    loss_hi: float
    actual_loss: float | None
    score: float | None = None
    score_lo: float | None = None
    score_hi: float | None = None
    actual_score: float | None = None


def bootstrap(fit, data: list[np.ndarray], start: dict, num: int, seed: int) -> list[dict]:
    """Refits of `fit(*columns, start=start)` on `num` resamples (with replacement) of the rows."""
    rng, n = np.random.default_rng(seed), len(data[0])
    return [fit(*(c[idx] for c in data), start=start) for idx in (rng.integers(0, n, n) for _ in range(num))]


def fit_runs(runs: list[Run], num_bootstrap: int = 200, seed: int = 0) -> dict:
    """Fit the loss law (and the sigmoid if scores are given) on the train runs, predict the
    held-out runs with intervals. Returns a JSON-ready dict."""
    train = [r for r in runs if not r.heldout and r.loss is not None]
    cols = [np.array([getattr(r, k) for r in train]) for k in ("params", "tokens", "loss")]
    law = fit_loss_law(*cols)
    law_boot = bootstrap(fit_loss_law, cols, law, num_bootstrap, seed)
    scored = [r for r in train if r.score is not None]
    sig, sig_boot = None, []
    if scored:
        s_cols = [np.array([r.loss for r in scored]), np.array([r.score for r in scored])]
        sig = fit_sigmoid(*s_cols)
        sig_boot = bootstrap(fit_sigmoid, s_cols, sig, num_bootstrap, seed)
    preds = [predict(r, law, law_boot, sig, sig_boot) for r in runs if r.heldout]
    return {"law": law, "sigmoid": sig, "predictions": [asdict(p) for p in preds], "num_train": len(train)}


def predict(run: Run, law, law_boot, sig, sig_boot) -> Prediction:
    losses = np.array([loss_law(run.params, run.tokens, **p) for p in law_boot])
    p = Prediction(
        run.params,
        run.tokens,
        float(loss_law(run.params, run.tokens, **law)),
        *map(float, np.percentile(losses, [5, 95])),
        run.loss,
    )
    if sig is not None:  # the score at the predicted loss; its interval carries both fits' spread
        scores = np.array([sigmoid_score(lo, **s) for lo, s in zip(losses, sig_boot)])
        p.score = float(sigmoid_score(p.loss, **sig))
        p.score_lo, p.score_hi = map(float, np.percentile(scores, [5, 95]))
        p.actual_score = run.score
    return p


def plot_fit(runs: list[Run], result: dict, path: str | Path) -> None:
    from edgelm.profiler.plots import _plt

    plt = _plt()
    fig, axes = plt.subplots(
        1, 2 if result["sigmoid"] else 1, figsize=(11 if result["sigmoid"] else 6, 4), squeeze=False
    )
    _plot_law(axes[0][0], runs, result)
    if result["sigmoid"]:
        _plot_sigmoid(axes[0][1], runs, result)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_law(ax, runs, result) -> None:
    Ns = np.geomspace(min(r.params for r in runs), max(r.params for r in runs), 50)
    for i, D in enumerate(sorted({r.tokens for r in runs})):
        color = f"C{i % 10}"
        ax.plot(Ns, loss_law(Ns, D, **result["law"]), color=color, lw=1, label=f"D={D:.3g}")
        pts = [r for r in runs if r.tokens == D and r.loss is not None and not r.heldout]
        ax.scatter([r.params for r in pts], [r.loss for r in pts], color=color, s=12)
    for p in result["predictions"]:
        err = [[p["loss"] - p["loss_lo"]], [p["loss_hi"] - p["loss"]]]
        ax.errorbar(p["params"], p["loss"], yerr=err, fmt="s", color="black", capsize=3)
        if p["actual_loss"] is not None:
            ax.scatter(p["params"], p["actual_loss"], marker="x", color="red", s=40, zorder=5)
    ax.set(
        xscale="log",
        xlabel="parameters N",
        ylabel="loss",
        title="L(N, D) fit; held-out: ■ predicted, × actual",
    )
    ax.legend(fontsize=7)


def _plot_sigmoid(ax, runs, result) -> None:
    pts = [r for r in runs if r.score is not None and r.loss is not None and not r.heldout]
    Ls = np.linspace(min(r.loss for r in pts) * 0.9, max(r.loss for r in pts) * 1.1, 100)
    ax.plot(Ls, sigmoid_score(Ls, **result["sigmoid"]), color="C0")
    ax.scatter([r.loss for r in pts], [r.score for r in pts], s=12, color="C0")
    for p in [p for p in result["predictions"] if p["score"] is not None]:
        err = [[p["score"] - p["score_lo"]], [p["score_hi"] - p["score"]]]
        ax.errorbar(p["loss"], p["score"], yerr=err, fmt="s", color="black", capsize=3)
    ax.set(xlabel="loss", ylabel="task score", title="loss -> score sigmoid")


def write_result(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
