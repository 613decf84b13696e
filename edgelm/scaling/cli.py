"""`edgelm scaling fit` (ModelTunnel-style)."""

import json
import sys
from pathlib import Path


def add_scaling_parser(sub) -> None:
    sc = sub.add_parser("scaling", help="fit L(N, D) and a loss -> score sigmoid over a table of runs")
    verbs = sc.add_subparsers(dest="scaling_command", required=True)
    fit = verbs.add_parser("fit", help="fit, predict held-out runs with intervals, plot")
    fit.add_argument("runs", help="CSV: params,tokens,loss[,score][,split=train|heldout]")
    fit.add_argument("--bootstrap", type=int, default=200, help="resamples for the 90%% intervals")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", default=None, help="JSON result file (default: print)")
    fit.add_argument("--plot", default=None, help="PNG of the fits and predictions")


def cmd_scaling(args) -> None:
    from edgelm.scaling.fit import fit_runs, plot_fit, read_runs

    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be positive, got {args.bootstrap}")
    runs = read_runs(args.runs)
    result = fit_runs(runs, args.bootstrap, args.seed)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.plot:
        plot_fit(runs, result, args.plot)
    law = result["law"]
    print("L(N, D) = {E:.4g} + {A:.4g}/N^{alpha:.4g} + {B:.4g}/D^{beta:.4g}".format(**law), file=sys.stderr)
