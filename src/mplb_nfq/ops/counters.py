"""The worker's packet counters and its decision-time histogram; a report of them that another
worker sends the first one, and their sum over all workers."""
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
class Report:
    """One worker's counters; `tokens` and `flows` are the sizes of its core's tables."""
    stats: Counter[str] = field(default_factory=_stats)
    kinds: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    flows: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

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
                      [a + b for a, b in zip(self.latency_counts, other.latency_counts)],
                      self.latency_sum + other.latency_sum)
