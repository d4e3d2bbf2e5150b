"""Prometheus metrics of the service: request counts and latency histograms per route, index size.

Written in the Prometheus text exposition format (version 0.0.4) by hand: a few counters and
histograms need no client library. Each worker process keeps its own figures.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict

# Upper bounds of the latency buckets, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Thread-safe counters and histograms, rendered by ``render``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[tuple[str, str], list[int]] = {}
        self._sums: dict[tuple[str, str], float] = defaultdict(float)
        self._counters: dict[str, int] = defaultdict(int)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        key = (method, route)
        with self._lock:
            self._requests[(method, route, status)] += 1
            counts = self._buckets.setdefault(key, [0] * (len(BUCKETS) + 1))
            counts[bisect_left(BUCKETS, seconds)] += 1
            self._sums[key] += seconds

    def count(self, name: str) -> None:
        """Add one to a named counter (e.g. rejected uploads)."""
        with self._lock:
            self._counters[name] += 1

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        """The exposition text; ``gauges`` maps a metric name to (value, help text)."""
        lines = [
            "# HELP lookalike_requests_total HTTP requests answered, by method, route and status code.",
            "# TYPE lookalike_requests_total counter",
        ]
        with self._lock:
            for (method, route, status), n in sorted(self._requests.items()):
                lines.append(f'lookalike_requests_total{{method="{method}",route="{_label(route)}",status="{status}"}} {n}')
            lines += [
                "# HELP lookalike_request_duration_seconds Time to answer a request, by method and route.",
                "# TYPE lookalike_request_duration_seconds histogram",
            ]
            for (method, route), counts in sorted(self._buckets.items()):
                labels = f'method="{method}",route="{_label(route)}"'
                running = 0
                for bound, n in zip(BUCKETS, counts):
                    running += n
                    lines.append(f'lookalike_request_duration_seconds_bucket{{{labels},le="{bound}"}} {running}')
                running += counts[-1]
                lines.append(f'lookalike_request_duration_seconds_bucket{{{labels},le="+Inf"}} {running}')
                lines.append(f"lookalike_request_duration_seconds_sum{{{labels}}} {self._sums[(method, route)]:.6f}")
                lines.append(f"lookalike_request_duration_seconds_count{{{labels}}} {running}")
            for name, n in sorted(self._counters.items()):
                lines += [f"# TYPE lookalike_{name}_total counter", f"lookalike_{name}_total {n}"]
        for name, (value, help_text) in sorted(gauges.items()):
            lines += [f"# HELP lookalike_{name} {help_text}", f"# TYPE lookalike_{name} gauge", f"lookalike_{name} {value:g}"]
        return "\n".join(lines) + "\n"
