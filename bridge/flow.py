"""Bounded flow: messages and bytes between receipt and source acknowledgement."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from bridge.message import Pending
from bridge.stats import Stats

if TYPE_CHECKING:
    from bridge.mqtt import MqttConnection


class Flow:
    """Admits a message only while both caps have room; wakes the reader when they do again."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0
        self.peak_messages = 0
        self.peak_bytes = 0
        self._blocked = False
        self._resume_at = max(0, max_messages - max(1, max_messages // 10))
        self._waiters: list[Callable[[], None]] = []

    def try_admit(self, size: int) -> bool:
        # One message larger than the byte cap still passes when nothing else is in flight.
        if self.messages >= self.max_messages or (
            self.messages and self.bytes + size > self.max_bytes
        ):
            self._blocked = True
            return False
        self.messages += 1
        self.bytes += size
        self.peak_messages = max(self.peak_messages, self.messages)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return True

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

    def on_space(self, wake: Callable[[], None]) -> Callable[[], None]:
        self._waiters.append(wake)
        return lambda: self._waiters.remove(wake)


class AckQueue:
    """Acknowledges one source connection's messages in arrival order (MQTT-4.6.0-2).

    A message finished out of order waits for those before it. When the connection is
    gone, finished messages only free their room: the broker redelivers them to the
    resumed session, which the counters record as duplicates downstream.
    """

    def __init__(self, flow: Flow, conn: MqttConnection, stats: Stats) -> None:
        self._flow = flow
        self._queue: deque[Pending] = deque()
        self.conn: MqttConnection | None = conn
        self._stats = stats

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, pending: Pending) -> None:
        self._queue.append(pending)

    def complete(self, pending: Pending) -> None:
        pending.holds -= 1
        if pending.holds:
            return
        pending.done = True
        queue = self._queue
        if queue[0] is not pending:
            return
        conn = self.conn
        release = self._flow.release
        stats = self._stats
        while queue and queue[0].done:
            head = queue.popleft()
            if conn is None:
                stats.abandoned += 1
            else:
                if head.qos:
                    conn.puback(head.packet_id)
                stats.acknowledged += 1
            release(head.size)

    def detach(self) -> None:
        """The connection is lost: later completions must not be acknowledged on another."""
        self.conn = None
