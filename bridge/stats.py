"""Counters of the flow: plain integers on the hot path, read by /metrics and the stats log."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Stats:
    routes: list[str]
    received: list[int] = field(default_factory=list)
    published: list[int] = field(default_factory=list)
    # (route index, reason) -> count
    dropped: Counter[tuple[int, str]] = field(default_factory=Counter)
    dead_lettered: Counter[tuple[int, str]] = field(default_factory=Counter)
    acknowledged: int = 0
    abandoned: int = 0  # finished after their source connection was lost: redelivered later

    def __post_init__(self) -> None:
        self.received = [0] * len(self.routes)
        self.published = [0] * len(self.routes)

    def route_index(self, label: str) -> int:
        return self.routes.index(label)

    def summary(self) -> dict[str, int]:
        return {
            "received": sum(self.received),
            "published": sum(self.published),
            "acknowledged": self.acknowledged,
            "dropped": sum(self.dropped.values()),
            "dead_lettered": sum(self.dead_lettered.values()),
        }
