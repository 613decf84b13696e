"""Memory by component: weights and caches from tensor bytes, activations from the peak RSS of a
forward (Linux `clear_refs` resets the peak), "other" from the process before the model existed."""

from pathlib import Path

_STATUS = Path("/proc/self/status")


def read_status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"{field} not in /proc/self/status (Linux only)")


def rss_bytes() -> int:
    return read_status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return read_status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def breakdown(weights: int, kv: int, baseline_rss: int, peak: int, rss_before_forward: int) -> dict:
    """weights + kv + activations + other, each measured on its own, next to the measured peak."""
    activations = max(0, peak - rss_before_forward)
    parts = {"weights": weights, "kv_cache": kv, "activations": activations, "other": baseline_rss}
    return {**parts, "sum": sum(parts.values()), "measured_peak_rss": peak}
