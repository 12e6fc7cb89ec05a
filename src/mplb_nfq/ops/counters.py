"""The worker's packet counters and its decision-time histogram; a report of them that another
worker sends the first one, and their sum over all workers. Histogram: counts by bucket as
Prometheus shows them (the cluster's propagation delay is one too)."""
from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)
VERDICTS = ("accept", "reject", "drop", "errors")


def _stats() -> Counter[str]:
    # every key there from the start: the metrics thread reads them while the packet loop counts
    return Counter(tokens_installed=0, tokens_rejected=0, tokens_refused=0, tokens_removed=0, token_install_errors=0,
                   tokens_provisional=0, tokens_proven=0, tokens_pushed_out=0,
                   tokens_taken_over=0)


@dataclass
class Histogram:
    """Counts per bucket (the last one: above every bound) and the sum of what was observed."""
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def plus(self, other: Histogram) -> Histogram:
        return Histogram(self.bounds, [a + b for a, b in zip(self.counts, other.counts)], self.sum + other.sum)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (upper bound, count at or below it), the last one +Inf."""
        buckets, total = [], 0
        for bound, count in zip([repr(b) for b in self.bounds] + ["+Inf"], self.counts):
            total += count
            buckets.append((bound, total))
        return buckets


@dataclass
class Report:
    """One worker's counters; `tokens` and `flows` are the sizes of its core's tables."""
    stats: Counter[str] = field(default_factory=_stats)
    kinds: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    flows: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    @property
    def handled(self) -> int:
        return sum(self.stats[k] for k in VERDICTS)

    def plus(self, other: Report) -> Report:
        stats, kinds = Counter(self.stats), Counter(self.kinds)
        stats.update(other.stats)  # update, not +: a counter at 0 stays a key
        kinds.update(other.kinds)
        return Report(stats, kinds,
                      max(self.tokens, other.tokens),  # each worker holds the tokens it saw
                      self.flows + other.flows,
                      self.latency.plus(other.latency))
