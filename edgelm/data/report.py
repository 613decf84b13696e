"""The filter report: kept/dropped counts and the score histogram, as JSON and a PNG."""

import json
from dataclasses import asdict
from pathlib import Path

from edgelm.data.ultraclean import BINS, FilterReport
from edgelm.profiler.plots import _plt


def write_report(report: FilterReport, prefix: str | Path) -> tuple[Path, Path]:
    """Write `<prefix>.json` and `<prefix>.png`; returns both paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    js, png = Path(f"{prefix}.json"), Path(f"{prefix}.png")
    js.write_text(json.dumps({**asdict(report), "docs_per_s": report.docs_per_s}, indent=2))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = [i / BINS for i in range(BINS)]
    colors = ["tab:green" if e + 0.5 / BINS >= report.threshold else "tab:red" for e in edges]
    ax.bar(edges, report.histogram, width=1 / BINS, align="edge", color=colors, edgecolor="black")
    ax.axvline(report.threshold, color="black", linestyle="--", label=f"threshold {report.threshold:g}")
    ax.set(xlabel="P(high quality)", ylabel="documents", xlim=(0, 1))
    ax.set_title(f"kept {report.num_kept}, dropped {report.num_dropped} ({report.engine})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return js, png
