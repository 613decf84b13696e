"""ModelTunnel-style scaling fits: known parameters recovered from synthetic runs, held-out
predictions with intervals, the CLI's JSON and PNG, and clear errors on bad tables."""

import json

import numpy as np
import pytest

pytest.importorskip("scipy", reason="scaling fits need scipy (pip install 'edgelm[data]')")

from edgelm.cli import main
from edgelm.scaling.fit import fit_loss_law, fit_runs, fit_sigmoid, loss_law, read_runs, sigmoid_score

TRUE_LAW = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Chinchilla's fit
TRUE_SIGMOID = {"lo": 0.25, "hi": 0.85, "k": 6.0, "L0": 2.6}  # chance 25%, saturating at 85%


def synthetic_runs(noise: float, seed: int = 0):
    """A 6 x 5 grid of (N, D) with multiplicative noise on the loss."""
    rng = np.random.default_rng(seed)
    N, D = np.meshgrid(np.geomspace(1e6, 3e8, 6), np.geomspace(1e8, 3e10, 5))
    N, D = N.ravel(), D.ravel()
    L = loss_law(N, D, **TRUE_LAW) * (1 + noise * rng.standard_normal(N.shape))
    return N, D, L


def test_loss_law_recovers_known_parameters_within_5_percent():
    fit = fit_loss_law(*synthetic_runs(noise=0.001))
    for name, true in TRUE_LAW.items():
        assert fit[name] == pytest.approx(true, rel=0.05), name


def test_sigmoid_recovers_known_parameters_within_5_percent():
    rng = np.random.default_rng(1)
    L = np.linspace(1.8, 3.6, 25)
    score = sigmoid_score(L, **TRUE_SIGMOID) + 0.002 * rng.standard_normal(L.shape)
    fit = fit_sigmoid(L, score)
    for name, true in TRUE_SIGMOID.items():
        assert fit[name] == pytest.approx(true, rel=0.05), name


def write_table(path, heldout_from: float = 2e8):
    N, D, L = synthetic_runs(noise=0.003, seed=2)
    rows = ["params,tokens,loss,score,split"]
    for n, d, loss in zip(N, D, L):
        split = "heldout" if n >= heldout_from else "train"
        rows.append(f"{n:.6g},{d:.6g},{loss:.6f},{sigmoid_score(loss, **TRUE_SIGMOID):.5f},{split}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_heldout_predictions_with_intervals(tmp_path):
    runs = read_runs(write_table(tmp_path / "runs.csv"))
    result = fit_runs(runs, num_bootstrap=20)
    preds = result["predictions"]
    assert len(preds) == 5 and result["num_train"] == 25  # the largest N, extrapolated
    for p in preds:
        assert p["loss_lo"] <= p["loss"] <= p["loss_hi"]
        assert p["loss"] == pytest.approx(p["actual_loss"], rel=0.02)
        assert p["score_lo"] <= p["score"] <= p["score_hi"]
        assert p["score"] == pytest.approx(p["actual_score"], abs=0.03)


def test_cli_writes_json_and_png(tmp_path):
    table = write_table(tmp_path / "runs.csv")
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    assert (
        main(["scaling", "fit", str(table), "--bootstrap", "10", "--out", str(out), "--plot", str(png)]) == 0
    )
    assert json.loads(out.read_text())["law"]["alpha"] == pytest.approx(TRUE_LAW["alpha"], rel=0.1)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "table, message",
    [
        ("params,tokens\n1e6,1e9\n", "missing column"),
        ("params,tokens,loss\n1e6,1e9,x\n", "not a number"),
        ("params,tokens,loss,split\n1e6,1e9,3,test\n", "split must be"),
    ],
)
def test_bad_tables(tmp_path, table, message):
    path = tmp_path / "bad.csv"
    path.write_text(table)
    with pytest.raises(ValueError, match=message):
        read_runs(path)


def test_bad_runs():
    N, D, L = synthetic_runs(noise=0.0)
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_loss_law(N[:3], D[:3], L[:3])
    with pytest.raises(ValueError, match="positive"):
        fit_loss_law(-N, D, L)
    with pytest.raises(ValueError, match="vary both"):
        fit_loss_law(N, np.full_like(D, 1e9), L)
