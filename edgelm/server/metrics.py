"""Server metrics in the Prometheus text format, written by hand (no client library needed)."""

from collections import Counter

from edgelm.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
                break

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for le, c in zip(self.buckets, self.counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum}"]
        return lines + [f"{self.name}_count {self.count}"]


class Metrics:
    """Counters and histograms the routes update; gauges are read from the engine on render."""

    def __init__(self):
        self.requests: Counter[int] = Counter()  # by HTTP status
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft = Histogram("edgelm_time_to_first_token_seconds", "Request arrival to its first token.")
        self.itl = Histogram("edgelm_inter_token_latency_seconds", "Time between a sequence's tokens.")

    def render(self, stats: EngineStats) -> str:
        lines = [
            "# HELP edgelm_requests_total HTTP requests to /v1 by status.",
            "# TYPE edgelm_requests_total counter",
        ]
        lines += [f'edgelm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += _single(
            "edgelm_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens
        )
        lines += _single(
            "edgelm_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens
        )
        lines += _single(
            "edgelm_num_requests_waiting", "gauge", "Sequences waiting for a slot.", stats.num_waiting
        )
        lines += _single("edgelm_num_requests_running", "gauge", "Sequences in the batch.", stats.num_running)
        lines += _single(
            "edgelm_preemptions_total",
            "counter",
            "Sequences preempted (recomputed later).",
            stats.num_preempted,
        )
        lines += _single(
            "edgelm_cache_bytes_in_use",
            "gauge",
            "KV cache bytes held by sequences.",
            stats.cache_bytes_in_use,
        )
        lines += _single(
            "edgelm_cache_bytes_capacity", "gauge", "KV cache budget in bytes.", stats.cache_bytes_capacity
        )
        lines += _single(
            "edgelm_cache_bytes_allocated",
            "gauge",
            "KV cache buffer bytes allocated.",
            stats.cache_bytes_allocated,
        )
        return "\n".join(lines + self.ttft.render() + self.itl.render()) + "\n"


def _single(name: str, kind: str, help: str, value) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
