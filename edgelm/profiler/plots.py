"""PNG plots and the Markdown report for `edgelm profile` (matplotlib, imported lazily)."""

from pathlib import Path


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("plots need matplotlib: pip install 'edgelm[test]' or pip install matplotlib") from e
    return plt


def label(run: dict) -> str:
    return f"{run['backend']} {run['quant']} t{run['threads']}"


def plot_prefill(report: dict, path: Path) -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in report["runs"]:
        n = [r["prompt_tokens"] for r in run["by_prompt"]]
        a.plot(n, [r["ttft_s"] * 1e3 for r in run["by_prompt"]], marker="o", label=label(run))
        b.plot(n, [r["prefill_tok_s"] for r in run["by_prompt"]], marker="o", label=label(run))
    for ax, title in ((a, "first-token time (ms)"), (b, "prefill tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decode(report: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in report["runs"]:
        n = [r["prompt_tokens"] for r in run["by_prompt"]]
        ax.plot(n, [r["decode_ms_per_token"] for r in run["by_prompt"]], marker="o", label=label(run))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context position (prompt tokens)")
    ax.set_ylabel("decode ms/token (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stacked(path: Path, bars: dict[str, dict[str, float]], ylabel: str, title: str) -> Path:
    plt = _plt()
    keys = sorted({k for parts in bars.values() for k in parts})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(bars)), 4.5))
    bottoms = [0.0] * len(bars)
    for key in keys:
        vals = [parts.get(key, 0.0) for parts in bars.values()]
        ax.bar(list(bars), vals, bottom=bottoms, label=key)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def shares(ops: dict) -> dict[str, float]:
    total = sum(ops["ops_s"].values())
    return {k: 100 * v / total for k, v in ops["ops_s"].items()}


def draw_all(report: dict, out: Path) -> list[Path]:
    native = [r for r in report["runs"] if "ops" in r]
    images = [plot_prefill(report, out / "prefill.png"), plot_decode(report, out / "decode.png")]
    if native:
        for phase in ("prefill", "decode"):
            bars = {label(r): shares(r["ops"][phase]) for r in native}
            images.append(stacked(out / f"ops_{phase}.png", bars, "% of step time", f"{phase}: time by operator"))
        mem = {label(r): {k: v / 2**20 for k, v in r["memory"].items() if k not in ("sum", "measured_peak_rss")}
               for r in native}
        images.append(stacked(out / "memory.png", mem, "MiB", "memory by component"))
    return images


def markdown(report: dict, images: list[Path]) -> str:
    m = report["machine"]
    lines = [f"# Profile: {Path(report['model']).name}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {', '.join(m['isa'])}; torch {m['torch']}.", "",
             "| run | prompt | TTFT ms | prefill tok/s | decode ms/token | cache MiB |", "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for r in run["by_prompt"]:
            lines.append(f"| {label(run)} | {r['prompt_tokens']} | {r['ttft_s'] * 1e3:.1f} | {r['prefill_tok_s']:.0f} "
                         f"| {r['decode_ms_per_token']:.1f} | {r['cache_bytes'] / 2**20:.1f} |")
    for run in (r for r in report["runs"] if "ops" in r):
        lines += ["", f"## {label(run)}: time by operator class (% of step)", "", "| class | prefill | decode |",
                  "|---|---|---|"]
        pre, dec = shares(run["ops"]["prefill"]), shares(run["ops"]["decode"])
        for k in sorted(set(pre) | set(dec), key=lambda k: -dec.get(k, 0)):
            lines.append(f"| {k} | {pre.get(k, 0):.1f} | {dec.get(k, 0):.1f} |")
        mem = run["memory"]
        lines += ["", "| memory | MiB |", "|---|---|"] + [f"| {k} | {v / 2**20:.1f} |" for k, v in mem.items()]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"
