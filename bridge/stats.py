"""Counters of the flow: plain integers on the hot path, read by /metrics and the stats log."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from bridge.reasons import DROP_REASONS, NO_ROUTE

# End-to-end latency buckets (seconds): source receipt -> target acknowledgement.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(slots=True)
class Stats:
    routes: list[str]
    received: list[int] = field(default_factory=list)
    published: list[int] = field(default_factory=list)
    # (route index, reason) -> count
    dropped: Counter[tuple[int, str]] = field(default_factory=Counter)
    dead_lettered: Counter[tuple[int, str]] = field(default_factory=Counter)
    # Acknowledged without forwarding, by design: `cohort` (the device is outside it).
    skipped: Counter[tuple[int, str]] = field(default_factory=Counter)
    reloads: Counter[str] = field(default_factory=Counter)  # "applied" | "refused"
    # Per route: messages finished (acknowledged or abandoned); in flight = received - finished.
    finished: list[int] = field(default_factory=list)
    # Per route: loop time of the last target acknowledgement (0.0: none yet).
    last_published: list[float] = field(default_factory=list)
    acknowledged: int = 0
    abandoned: int = 0  # finished after their source connection was lost: redelivered later
    # Per route: a count per bucket (the last one is +Inf), and the sum of observations.
    latency_counts: list[list[int]] = field(default_factory=list)
    latency_sums: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.received = [0] * len(self.routes)
        self.published = [0] * len(self.routes)
        self.finished = [0] * len(self.routes)
        self.last_published = [0.0] * len(self.routes)
        self.latency_counts = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in self.routes]
        self.latency_sums = [0.0] * len(self.routes)
        # Zero series for the known reasons, so alerts on increase() see them from the start.
        for route in range(len(self.routes)):
            for reason in DROP_REASONS:
                self.dropped[(route, reason)] += 0
            self.skipped[(route, "cohort")] += 0
        for result in ("applied", "refused"):
            self.reloads[result] += 0

    def seed_dead_letters(self, reasons: list[str]) -> None:
        """Zero series for the dead-letter reasons this worker can produce (``reasons``)."""
        for route in range(len(self.routes)):
            for reason in reasons:
                self.dead_lettered[(route, reason)] += 0
        if self.routes:
            self.dead_lettered[(0, NO_ROUTE)] += 0

    def observe_latency(self, route: int, seconds: float) -> None:
        self.latency_counts[route][bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sums[route] += seconds

    def summary(self) -> dict[str, int]:
        return {
            "received": sum(self.received),
            "published": sum(self.published),
            "acknowledged": self.acknowledged,
            "dropped": sum(self.dropped.values()),
            "dead_lettered": sum(self.dead_lettered.values()),
            "skipped": sum(self.skipped.values()),
        }
