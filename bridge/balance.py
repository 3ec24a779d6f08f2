"""Which target connection a message goes to: balanced pinning (pure, no I/O).

Order per topic needs a topic's messages on one connection at a time, because a
connection publishes in submission order and two connections race. Pinning every topic
to one connection for good (CRC32 of the topic) keeps order but leaves throughput on the
table: with 200 connections paced at 100 msg/s and 2,000 device topics, the busiest
connection carried 1.9 times the mean and the pool reached 0.53 of what pacing allows.

So a topic is pinned only while it has messages on a connection (queued or in flight).
A topic with none is free to move: its next message goes to the connection with the
fewest outstanding messages. Outstanding messages are the common measure of a
connection's window and tokens: a connection short of either, throttled or down keeps
its messages longer, so it gets fewer new topics. When a QoS 1 message is finished, the
target acknowledged it, so anything sent after it on another connection arrives later.

QoS 0 has no acknowledgement: "finished" only means handed to a socket, and the broker
may read another connection's socket first. An idle topic's QoS 0 message therefore
goes to the topic's hash connection, so a QoS 0 stream keeps one connection and its
order. (A topic that mixes QoS 0 and QoS 1 may see a QoS 0 message overtaken by the
next QoS 1 message sent on another connection: MQTT itself orders per QoS level only.)
"""

from __future__ import annotations

import zlib


class Balancer:
    """Assigns messages to ``links`` connections; told when each one is finished.

    Every operation is O(1): connections are kept in buckets by outstanding count, and
    the lowest non-empty bucket is tracked as counts move by one.
    """

    def __init__(self, links: int) -> None:
        self.links = links
        self.load = [0] * links  # outstanding messages per connection
        # topic -> [connection, outstanding messages of this topic]
        self._pins: dict[bytes, list[int]] = {}
        # by_load[n]: the connections with n outstanding messages. A list as long as
        # the highest load + 1 (the flow bounds it; an empty set is 216 B, less than
        # one message), where empty sets below the top stay: every message moves a
        # connection twice, so this is the hot part of balancing.
        self._by_load: list[set[int]] = [set(range(links))]
        self._least = 0

    @property
    def pinned(self) -> int:
        """Topics with messages on a connection now (memory: bounded by the flow)."""
        return len(self._pins)

    def assign(self, topic: bytes, qos: int) -> int:
        """The connection for one message of ``topic``; count it until ``finished``."""
        pin = self._pins.get(topic)
        if pin is None:
            link = zlib.crc32(topic) % self.links if qos == 0 else self._least_loaded()
            pin = self._pins[topic] = [link, 0]
        link = pin[0]
        pin[1] += 1
        self._move(link, 1)
        return link

    def finished(self, topic: bytes) -> None:
        """One message of ``topic`` is off its connection (acknowledged, or done with)."""
        pin = self._pins[topic]
        pin[1] -= 1
        if not pin[1]:
            del self._pins[topic]
        self._move(pin[0], -1)

    def _least_loaded(self) -> int:
        by_load = self._by_load
        least = self._least
        while not by_load[least]:
            least += 1
        self._least = least
        return next(iter(by_load[least]))

    def _move(self, link: int, step: int) -> None:
        by_load = self._by_load
        load = self.load
        old = load[link]
        new = load[link] = old + step
        bucket = by_load[old]
        bucket.discard(link)
        if new == len(by_load):
            by_load.append(set())
        elif step < 0 and not bucket and old == len(by_load) - 1:
            by_load.pop()  # the top emptied: shrink back as loads fall
        by_load[new].add(link)
        if new < self._least:  # noqa: PLR1730 (min() is a call: this is the hot path)
            self._least = new
