"""End-to-end heartbeat: readiness that means "messages flow" (MirrorMaker 2's idea).

Connected and subscribed is not enough: a hung broker keeps its TCP connections open, an
ACL can swallow publishes, a broker can grant a subscription and never serve it. So every
``interval`` a worker publishes a small message on the *source* broker, on a topic of its
own. Its source connection subscribes to that topic (plain, QoS 0: a stopped worker's
session collects none), the bridge carries it like any message — source connection, target
connection, target PUBACK — to ``target_topic`` on the *target*, and a reader connection of
this module subscribes there. A heartbeat read back proves the whole path; the time it took
is ``heartbeat_latency_seconds``. When none crossed for ``stale_after`` seconds, /readyz
answers 503 and names the stage where the oldest missing heartbeat stopped (``diagnose``).

Heartbeats are the bridge's own messages (``acks.INTERNAL``): never counted as traffic,
archived or dead-lettered. At most ``MAX_CARRIED`` are inside the bridge at once, so a hung
target cannot make them pile up.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from bridge.errors import ConnectionFailed
from bridge.failover import Failover
from bridge.link import Connection, ConnectionFactory, Link
from bridge.mqtt import Endpoint, SessionOptions
from bridge.mqtt_codec import Publish, reason_name
from bridge.outcome import DELIVERED, Outcome
from bridge.policy import POISON_DROPS
from bridge.service import Service
from bridge.stats import LATENCY_BUCKETS

MAX_CARRIED = 4  # heartbeats between the bridge's receipt and the target's answer
MAX_UNPUBLISHED = 8  # heartbeats the source broker has not acknowledged yet
WARMUP_INTERVAL = 0.5  # until the first heartbeat crosses: readiness should not wait long
# After the target refused a heartbeat, the next ones wait this long: a broker that refuses
# by disconnecting (AWS IoT Core on a topic its policy denies) would otherwise drop a
# traffic connection every interval.
REFUSED_PAUSE = 60.0
STAGES = (
    "sent",
    "published",
    "taken",
    "forwarded",
    "received",
    "refused",
    "skipped",
    "duplicate",
    "foreign",
)


class Stage(enum.IntEnum):
    """How far one heartbeat got."""

    SENT = 0  # handed to the publisher connection
    PUBLISHED = 1  # the source broker acknowledged it
    TAKEN = 2  # the bridge received it from its source subscription
    FORWARDED = 3  # the target acknowledged the bridge's copy
    READ = 4  # the reader got it back from the target


@dataclass(slots=True)
class Beat:
    seq: int
    sent_at: float  # event-loop time
    stage: Stage = Stage.SENT
    problem: str | None = None  # refused by the target, or skipped by the bridge


@dataclass(frozen=True, slots=True)
class Topics:
    source: str
    target: str


def diagnose(
    beats: list[Beat], now: float, publisher_up: bool, reader_up: bool, topics: Topics
) -> str:
    """Why no heartbeat crossed: the furthest stage of the oldest heartbeat after the last
    one that did. Pure, so every sentence below is a unit test."""
    if not publisher_up:
        return "the heartbeat publisher is not connected to the source broker"
    if not reader_up:
        return f"the heartbeat reader is not subscribed to {topics.target!r} on the target"
    if not beats:
        return "no heartbeat has been sent yet"
    last_read = max((i for i, b in enumerate(beats) if b.stage is Stage.READ), default=-1)
    missing = beats[last_read + 1 :]
    if not missing:
        return "no heartbeat was sent since the last one crossed"
    beat = missing[0]
    head = f"heartbeat {beat.seq} (sent {now - beat.sent_at:.1f} s ago)"
    if beat.problem is not None:
        return f"{head} {beat.problem}"
    if beat.stage is Stage.SENT:
        return f"{head} was not acknowledged by the source broker"
    if beat.stage is Stage.PUBLISHED:
        return (
            f"{head} was accepted by the source broker but never reached the bridge "
            f"(its subscription to {topics.source!r} is not served)"
        )
    if beat.stage is Stage.TAKEN:
        return f"{head} reached the bridge; the target has not acknowledged it"
    return (
        f"{head} was acknowledged by the target but never delivered to the reader "
        f"(subscription {topics.target!r})"
    )


class _HeartbeatLink(Link):
    def __init__(
        self,
        heartbeat: Heartbeat,
        endpoint: Endpoint,
        options: SessionOptions,
        connect_timeout: float,
        connect_interval: float,
        factory: ConnectionFactory,
        failover: Failover | None,
    ) -> None:
        super().__init__(0, endpoint, options, connect_timeout, connect_interval, factory, failover)
        self.heartbeat = heartbeat
        self.conn: Connection | None = None

    @property
    def up(self) -> bool:
        return self.conn is not None

    async def _on_connect(self, conn: Connection) -> None:
        self.conn = conn
        self._log.info(
            f"{self.side}.connected", endpoint=str(self.endpoint), client_id=self.options.client_id
        )

    def on_message(self, conn: Connection, msg: Publish) -> bool:
        if msg.qos:
            conn.puback(msg.packet_id)
        return True

    def on_puback(self, conn: Connection, packet_id: int, reason_code: int) -> None:
        pass

    def on_writable(self, conn: Connection, writable: bool) -> None:
        pass

    def on_connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        if conn is self.conn:
            self.conn = None

    async def close(self) -> None:
        self._stopping = True
        conn, self.conn = self._live, None
        if conn is not None:
            await conn.disconnect()


class Publisher(_HeartbeatLink):
    """Publishes the heartbeats on the source broker."""

    side = "heartbeat_publisher"

    def on_puback(self, conn: Connection, packet_id: int, reason_code: int) -> None:
        self.heartbeat.published(packet_id, reason_code)

    def on_connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        if conn is self.conn:
            self.heartbeat.publisher_lost()
        super().on_connection_lost(conn, exc)


class Reader(_HeartbeatLink):
    """Subscribes to the heartbeat's topic on the target and reads it back."""

    side = "heartbeat_reader"

    async def _on_connect(self, conn: Connection) -> None:
        topic = self.heartbeat.topics.target
        (code,) = await conn.subscribe([(topic, 0)], retain_as_published=False)
        if code >= 0x80:
            raise ConnectionFailed(
                f"heartbeat subscription to {topic!r} refused: {reason_name(code)}"
            )
        await super()._on_connect(conn)

    def on_message(self, conn: Connection, msg: Publish) -> bool:
        self.heartbeat.read_back(msg.payload)
        return super().on_message(conn, msg)


class Heartbeat(Service):
    """Sends heartbeats, follows each one through the bridge, and says whether they cross."""

    def __init__(
        self,
        topics: Topics,
        interval: float,
        stale_after: float,
        direction: str,
        instance_id: str,
    ) -> None:
        super().__init__()
        self.topics = topics
        self.interval = interval
        self.stale_after = stale_after
        self._loop = asyncio.get_running_loop()
        self._log = structlog.get_logger().bind(component="heartbeat")
        # Only this process's heartbeats count: another one under our instance_id (or an
        # earlier run's message) has another nonce.
        self._nonce = secrets.token_hex(6)
        self._identity = {"instance": instance_id, "direction": direction, "nonce": self._nonce}
        self._started = self._loop.time()
        self._seq = 0
        self._beats: deque[Beat] = deque(maxlen=64)
        self._by_packet: dict[int, Beat] = {}
        self._carried = 0
        self._crossed_at: float | None = None  # send time of the newest heartbeat read back
        self._refusing = False
        self._paused_until = 0.0
        self.latency: float | None = None
        self.counts: Counter[str] = Counter(dict.fromkeys(STAGES, 0))
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.publisher: Publisher | None = None
        self.reader: Reader | None = None
        self._running: set[Link] = set()
        self._source_up: Callable[[], bool] = lambda: True
        self._target_up: Callable[[], bool] = lambda: True

    def attach(
        self,
        publisher: Publisher,
        reader: Reader,
        source_up: Callable[[], bool],
        target_up: Callable[[], bool],
    ) -> None:
        """The two links, and what each waits for before its first connect: a heartbeat
        cannot cross before the bridge's own connections are up, and connecting beside
        them to a broker that refuses only doubles the failed connects (and can turn a
        TLS alert into a reset for the traffic's connection: measured with Mosquitto)."""
        self.publisher, self.reader = publisher, reader
        self._source_up, self._target_up = source_up, target_up

    async def start(self) -> None:
        self.spawn(self._tick(), name="heartbeat")

    def _start_links(self) -> None:
        for link, up in ((self.publisher, self._source_up), (self.reader, self._target_up)):
            if link is not None and link not in self._running and up():
                self._running.add(link)
                self.spawn(link.run(), name=link.side)

    async def close(self) -> None:
        """Stop sending (the graceful leave starts with this)."""
        for task in self._tasks:
            if task.get_name() == "heartbeat":
                task.cancel()
        for link in (self.publisher, self.reader):
            if link is not None:
                await link.close()

    # ---- sending -------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            self._start_links()
            self.send()
            crossed = self._crossed_at is not None
            await asyncio.sleep(self.interval if crossed else min(self.interval, WARMUP_INTERVAL))

    def send(self) -> None:
        link = self.publisher
        conn = link.conn if link is not None else None
        if conn is None or len(self._by_packet) >= MAX_UNPUBLISHED:
            return
        self._seq += 1
        payload = orjson.dumps({**self._identity, "seq": self._seq, "sent_at": time.time()})
        beat = Beat(self._seq, self._loop.time())
        packet_id = conn.publish(self.topics.source.encode(), payload, 1, False)
        self._by_packet[packet_id] = beat
        self._beats.append(beat)
        self.counts["sent"] += 1

    def published(self, packet_id: int, reason_code: int) -> None:
        beat = self._by_packet.pop(packet_id, None)
        if beat is None:
            return
        if reason_code >= 0x80:
            beat.problem = f"was refused by the source broker: {reason_name(reason_code)}"
            return
        self.counts["published"] += 1
        beat.stage = max(beat.stage, Stage.PUBLISHED)

    def publisher_lost(self) -> None:
        self._by_packet.clear()  # their PUBACKs will not come

    # ---- what the bridge reports -----------------------------------------------------

    def take(self, payload: bytes) -> bool:
        """The bridge received a heartbeat at the source; True: carry it to the target."""
        beat = self._find(payload)
        if beat is None:
            self.counts["foreign"] += 1
            return False
        if beat.stage >= Stage.TAKEN:
            self.counts["duplicate"] += 1  # redelivered: one copy proves as much
            return False
        if self._loop.time() < self._paused_until:
            self.counts["skipped"] += 1
            beat.problem = "was not forwarded: the target refused the heartbeat before it"
            return False
        if self._carried >= MAX_CARRIED:
            self.counts["skipped"] += 1
            beat.problem = (
                f"reached the bridge behind {self._carried} heartbeats the target has not "
                "acknowledged"
            )
            return False
        self._carried += 1
        self.counts["taken"] += 1
        beat.stage = max(beat.stage, Stage.TAKEN)
        return True

    def forwarded(self, payload: bytes, outcome: Outcome) -> None:
        """The target answered the bridge's copy of a heartbeat ``take`` let through."""
        self._carried -= 1
        beat = self._find(payload)
        if outcome is DELIVERED:
            self.counts["forwarded"] += 1
            if beat is not None:
                beat.stage = max(beat.stage, Stage.FORWARDED)
            self._refusing = False
            return
        reason = outcome.dead_letter_reason(POISON_DROPS)[0]
        self.counts["refused"] += 1
        self._paused_until = self._loop.time() + REFUSED_PAUSE
        if beat is not None:
            beat.problem = (
                f"was refused by the target ({reason}): point heartbeat.target_topic at a "
                "topic the target lets the bridge publish and subscribe to"
            )
        if not self._refusing:
            self._refusing = True  # once per episode, not once per heartbeat
            self._log.warning("heartbeat.refused", reason=reason, topic=self.topics.target)

    def read_back(self, payload: bytes) -> None:
        beat = self._find(payload)
        if beat is None:
            self.counts["foreign"] += 1
            return
        self.counts["received"] += 1
        if beat.stage is Stage.READ:
            return  # a duplicate (at least once): measured once
        beat.stage = Stage.READ
        now = self._loop.time()
        latency = now - beat.sent_at
        self.latency = latency
        self.latency_counts[bisect_left(LATENCY_BUCKETS, latency)] += 1
        self.latency_sum += latency
        if self._crossed_at is None:
            self._log.info("heartbeat.crossed", latency=round(latency, 4))
        elif not self.fresh:
            self._log.info("heartbeat.recovered", latency=round(latency, 4))
        self._crossed_at = max(self._crossed_at or 0.0, beat.sent_at)

    def _find(self, payload: bytes) -> Beat | None:
        try:
            data = orjson.loads(payload)
            if data.get("nonce") != self._nonce:
                return None
            seq = int(data["seq"])
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return None
        for beat in reversed(self._beats):
            if beat.seq == seq:
                return beat
        return None

    # ---- readiness and metrics -----------------------------------------------------

    @property
    def age(self) -> float:
        """Seconds since the newest heartbeat that crossed was sent (since start if none)."""
        return self._loop.time() - (self._crossed_at or self._started)

    @property
    def fresh(self) -> bool:
        return self._crossed_at is not None and self.age <= self.stale_after

    def state(self) -> dict[str, Any]:
        """The heartbeat's part of /readyz."""
        out: dict[str, Any] = {
            "fresh": self.fresh,
            "age": round(self.age, 3) if self._crossed_at is not None else None,
            "stale_after": self.stale_after,
            "latency": round(self.latency, 4) if self.latency is not None else None,
        }
        if not self.fresh:
            why = diagnose(
                list(self._beats),
                self._loop.time(),
                self.publisher is not None and self.publisher.up,
                self.reader is not None and self.reader.up,
                self.topics,
            )
            when = (
                f"no heartbeat crossed for {self.age:.1f} s (stale_after {self.stale_after:g} s)"
                if self._crossed_at is not None
                else "no heartbeat crossed yet"
            )
            out["problem"] = f"{when}: {why}"
        return out

    def metrics(self, direction: str) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            "mqtt_bridge_heartbeat_latency_seconds",
            "Heartbeat published on the source to read back on the target.",
            labels=["direction"],
        )
        bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        cumulative, running = [], 0
        for bound, count in zip(bounds, self.latency_counts, strict=True):
            running += count
            cumulative.append((bound, running))
        latency.add_metric([direction], cumulative, self.latency_sum)
        yield latency
        for name, value, doc in (
            (
                "heartbeat_age_seconds",
                self.age,
                "Age of the newest heartbeat that crossed (since start while none has).",
            ),
            ("heartbeat_stale_after_seconds", self.stale_after, "heartbeat.stale_after."),
        ):
            gauge = GaugeMetricFamily(f"mqtt_bridge_{name}", doc, labels=["direction"])
            gauge.add_metric([direction], value)
            yield gauge
        stages = CounterMetricFamily(
            "mqtt_bridge_heartbeats",
            "Heartbeats by stage: sent, published (source acked), taken (by the bridge), "
            "forwarded (target acked), received (read back); refused, skipped, foreign.",
            labels=["direction", "stage"],
        )
        for stage in STAGES:
            stages.add_metric([direction, stage], self.counts[stage])
        yield stages
