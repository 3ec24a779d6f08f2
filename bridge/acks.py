"""Source acknowledgements and their owner: a message's place in line, and the line.

A ``Pending`` is what must finish before a source message may be acknowledged; it
carries the callback that finishes it, so whoever completes a message (the target's
answer, the archive, the dead-letter sink) needs no idea of who acknowledges it. The
live flow's owner is an ``AckQueue`` per source connection; replay passes its own
callback and has no source at all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from bridge.flow import Flow
from bridge.stats import Stats

# The route index of the bridge's own messages (heartbeats): they keep their place in line
# for the source acknowledgement, but are neither counted as traffic nor held in the flow.
INTERNAL = -1


class Acknowledger(Protocol):
    """The source connection, as far as acknowledgements go."""

    def puback(self, packet_id: int) -> None: ...


@dataclass(slots=True, eq=False)
class Pending:
    """A source message's place in line for its acknowledgement."""

    packet_id: int
    qos: int
    size: int
    route: int
    on_done: Callable[[Pending], None]  # called once every hold is released
    done: bool = False
    # What must finish before the source acknowledgement: the target's answer, and in
    # `required` archive mode also the S3 object holding the record.
    holds: int = 1
    admitted_at: float = 0.0  # loop time: the age of the oldest message in flight

    def finish(self) -> None:
        """Release one hold (the target answered, the archive wrote, the dead letter landed)."""
        self.on_done(self)


class AckQueue:
    """Acknowledges one source connection's messages in arrival order (MQTT-4.6.0-2).

    A message finished out of order waits for those before it. When the connection is
    gone, finished messages only free their room: the broker redelivers them to the
    resumed session, which the counters record as duplicates downstream.
    """

    def __init__(self, flow: Flow, conn: Acknowledger, stats: Stats) -> None:
        self._flow = flow
        self._queue: deque[Pending] = deque()
        self.conn: Acknowledger | None = conn
        self._stats = stats
        self.admitted = 0  # traffic this connection took (per-connection metrics)
        # Bound once: every Pending of this connection carries the same callback.
        self.complete_one: Callable[[Pending], None] = self.complete

    def __len__(self) -> int:
        return len(self._queue)

    def admit(self, packet_id: int, qos: int, size: int, route: int, now: float = 0.0) -> Pending:
        """A new message in line behind the ones already here."""
        self.admitted += 1
        pending = Pending(packet_id, qos, size, route, self.complete_one, admitted_at=now)
        self._queue.append(pending)
        return pending

    def admit_internal(self, packet_id: int, qos: int) -> Pending:
        """The bridge's own message (a heartbeat): in line, but not counted as traffic."""
        pending = Pending(packet_id, qos, 0, INTERNAL, self.complete_one)
        self._queue.append(pending)
        return pending

    def oldest(self) -> float | None:
        """When the oldest message still waiting for its acknowledgement was admitted."""
        for pending in self._queue:
            if pending.route != INTERNAL:
                return pending.admitted_at
        return None

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
        finished = stats.finished
        while queue and queue[0].done:
            head = queue.popleft()
            if head.route == INTERNAL:
                if head.qos and conn is not None:
                    conn.puback(head.packet_id)
                continue
            finished[head.route] += 1
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
