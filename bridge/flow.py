"""Bounded flow: messages and bytes between receipt and source acknowledgement."""

from __future__ import annotations

import enum
from collections.abc import Callable


class WhenFull(enum.Enum):
    """What a message that finds the flow full gets (Vector's ``when_full``)."""

    BLOCK = "block"  # held, and reading stops: the backlog stays in the source broker
    DROP = "drop"  # dropped and counted as dropped{reason="full"}, never silently


class Flow:
    """Admits a message only while both caps have room; wakes the reader when they do again.

    QoS 1 always blocks when full (dropping it would break at-least-once); QoS 0 follows
    ``qos0_when_full``: it cannot be slowed down by the protocol, only held or dropped.
    """

    def __init__(
        self, max_messages: int, max_bytes: int, qos0_when_full: WhenFull = WhenFull.DROP
    ) -> None:
        self.max_messages = max_messages
        self.qos0_when_full = qos0_when_full
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0
        self.peak_messages = 0
        self.peak_bytes = 0
        self._blocked = False
        self._resume_at = max(0, max_messages - max(1, max_messages // 10))
        self._waiters: list[Callable[[], None]] = []
        self._full_watchers: list[Callable[[], None]] = []

    def try_admit(self, size: int) -> bool:
        # One message larger than the byte cap still passes when nothing else is in flight.
        if self.messages >= self.max_messages or (
            self.messages and self.bytes + size > self.max_bytes
        ):
            if not self._blocked:
                self._blocked = True
                for watcher in self._full_watchers:
                    watcher()
            return False
        self.messages += 1
        self.bytes += size
        self.peak_messages = max(self.peak_messages, self.messages)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return True

    def when_full(self, qos: int) -> WhenFull:
        return self.qos0_when_full if qos == 0 else WhenFull.BLOCK

    def release(self, size: int) -> None:
        self.messages -= 1
        self.bytes -= size
        # Hysteresis: waking the reader for every freed slot would pause and resume per message.
        if self._blocked and (
            self.messages <= self._resume_at or self.bytes <= self.max_bytes * 0.9
        ):
            self._blocked = False
            for wake in self._waiters:
                wake()

    def on_full(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher`` each time the flow becomes full (what holds messages can act:
        the archive in `required` mode writes its batch now instead of at its timer)."""
        self._full_watchers.append(watcher)

    def on_space(self, wake: Callable[[], None]) -> Callable[[], None]:
        self._waiters.append(wake)
        return lambda: self._waiters.remove(wake)
