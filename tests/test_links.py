"""Source and target links in-process, against a fake connection (the injected factory),
and the pure policy they act on. No socket: what a real broker cannot do on demand
(drop exactly here, answer 0x97 to exactly this message) is scripted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge import mqtt_codec as codec
from bridge.acks import AckQueue, Pending
from bridge.errors import ConnectionFailed
from bridge.flow import Flow, WhenFull
from bridge.link import Backoff
from bridge.message import Envelope
from bridge.mqtt import Endpoint, Listener, SessionOptions
from bridge.mqtt_codec import Publish
from bridge.outcome import DELIVERED, EXPIRED, POISON, Kind, Outcome
from bridge.pacing import Pacing
from bridge.policy import (
    POISON_DROPS,
    connack_violation,
    on_connection_lost,
    puback_outcome,
    qos_refusal,
)
from bridge.source import SourceLink
from bridge.stats import Stats
from bridge.target import TargetLink

ENDPOINT = Endpoint("fake", 1)
OPTIONS = SessionOptions(client_id="t-0", protocol=codec.PROTOCOL_5, clean_start=True)


@dataclass
class FakeConnection:
    """Records what a link does; the test plays the broker by calling the listener."""

    options: SessionOptions
    listener: Listener
    fail_connect: str | None = None
    session_present: bool = False
    disconnect_reason: int | None = None
    disconnect_detail: str = ""
    ack_reason: str = ""
    closed_by_us: bool = False
    server_receive_maximum: int = 65535
    max_qos: int = 1
    protocol_error: str | None = None
    has_unread: bool = False
    last_rx: float = 0.0
    published: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    pubacks: list[int] = field(default_factory=list)
    subscribed: list[list[tuple[str, int]]] = field(default_factory=list)
    _next_pid: int = 0

    def __post_init__(self) -> None:
        self._closed = asyncio.get_running_loop().create_future()

    @property
    def is_open(self) -> bool:
        return not self._closed.done()

    async def connect(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        if self.fail_connect:
            raise ConnectionFailed(self.fail_connect)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def disconnect(
        self, session_expiry: int | None = None, timeout: float = 2.0, with_will: bool = False
    ) -> None:
        self.drop()

    def abort(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    def drop(self, reason: int | None = None) -> None:
        """The broker closes the connection (with a DISCONNECT reason, or silently)."""
        if self._closed.done():
            return
        self.disconnect_reason = reason
        self._closed.set_result(None)
        self.listener.on_connection_lost(self, None)  # type: ignore[arg-type]

    def publish(
        self, topic: bytes, payload: bytes, qos: int, retain: bool, properties: Any = None
    ) -> int:
        pid = 0
        if qos:
            self._next_pid += 1
            pid = self._next_pid
        self.published.append((pid, topic, payload))
        return pid

    def puback(self, packet_id: int) -> None:
        self.pubacks.append(packet_id)

    def flush(self) -> None:
        pass  # nothing is buffered: publish() records at once

    async def subscribe(
        self, filters: list[tuple[str, int]], retain_as_published: bool, timeout: float = 10.0
    ) -> list[int]:
        self.subscribed.append(filters)
        return [1] * len(filters)

    async def unsubscribe(self, filters: list[str], timeout: float = 10.0) -> list[int]:
        return [0] * len(filters)

    def resume(self) -> None:
        pass

    def stop_reading(self) -> None:
        pass


class Factory:
    """Hands out fake connections; the first ``failures`` of them fail to connect."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.made: list[FakeConnection] = []

    def __call__(self, options: SessionOptions, listener: Listener) -> FakeConnection:
        fail = "refused by the script" if len(self.made) < self.failures else None
        conn = FakeConnection(options, listener, fail_connect=fail)
        self.made.append(conn)
        return conn

    async def connected(self, count: int) -> FakeConnection:
        for _ in range(1500):
            if len(self.made) >= count and self.made[-1].fail_connect is None:
                await asyncio.sleep(0)
                return self.made[-1]
            await asyncio.sleep(0.01)
        raise AssertionError(f"never got connection {count}")


def envelope(
    n: int, topic: bytes = b"t", qos: int = 1, expires_at: float | None = None
) -> Envelope:
    pending = Pending(n, qos, 1, 0, lambda p: None)
    payload = str(n).encode()
    msg = Publish(topic.decode(), payload, qos, False, False, n, None)
    return Envelope(
        source_topic=topic.decode(), topic=topic, payload=payload, qos=qos, retain=False,
        properties=None, received_at=0.0, expires_at=expires_at, route=0, pending=pending,
        source=msg, received_epoch=0.0,
    )  # fmt: skip


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, Outcome]] = []

    def __call__(self, env: Envelope, outcome: Outcome) -> None:
        self.seen.append((env.payload, outcome))


@contextlib.asynccontextmanager
async def running(link: TargetLink | SourceLink) -> AsyncIterator[None]:
    runner = asyncio.create_task(link.run())
    try:
        yield
    finally:
        if isinstance(link, TargetLink):
            await link.close()
        else:
            link.stop_taking()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


def target_link(
    factory: Factory, done: Callable[[Envelope, Outcome], None], canary: bool = False
) -> TargetLink:
    return TargetLink(
        0, ENDPOINT, OPTIONS, 10, 1.0, Pacing(), done, factory=factory,
        canary=(b"probe", None) if canary else None,
    )  # fmt: skip


async def test_target_link_delivers_in_order_and_republishes_after_a_drop() -> None:
    factory, outcomes = Factory(failures=2), Outcomes()
    link = target_link(factory, outcomes)
    async with running(link):
        for n in range(5):
            link.submit(envelope(n))
        first = await factory.connected(3)  # two scripted connect failures, then up
        assert [p for _, _, p in first.published] == [b"0", b"1", b"2", b"3", b"4"]
        link.on_puback(first, 1, 0)
        link.on_puback(first, 2, 0x87)  # not authorized: rejected, not retried
        first.drop()  # 3 unacknowledged messages were in flight
        second = await factory.connected(4)
        # Republished on the new connection, in their original order, one at a time
        # (probing) until a PUBACK proves the connection.
        assert [p for _, _, p in second.published] == [b"2"]
        link.on_puback(second, 1, 0)
        assert [p for _, _, p in second.published] == [b"2", b"3", b"4"]
        link.on_puback(second, 2, 0)
        link.on_puback(second, 3, 0)
        assert outcomes.seen == [
            (b"0", DELIVERED),
            (b"1", Outcome(Kind.REJECTED, 0x87)),
            (b"2", DELIVERED),
            (b"3", DELIVERED),
            (b"4", DELIVERED),
        ]
        assert link.reconnects == 1
        assert link.stats().published == 4


async def test_quota_exceeded_is_retried_not_dead_lettered() -> None:
    factory, outcomes = Factory(), Outcomes()
    link = target_link(factory, outcomes)
    async with running(link):
        conn = await factory.connected(1)
        link.submit(envelope(7))
        link.on_puback(conn, 1, 0x97)
        assert outcomes.seen == []
        assert link.stats().throttled == {"quota_exceeded": 1}
        assert link.stats().window < 10  # unpaced: the window takes the throttle
        assert [p for _, _, p in conn.published] == [b"7", b"7"]
        link.on_puback(conn, 2, 0)
        assert outcomes.seen == [(b"7", DELIVERED)]


async def test_a_message_that_breaks_the_connection_every_time_is_poison() -> None:
    factory, outcomes = Factory(), Outcomes()
    link = target_link(factory, outcomes)
    async with running(link):
        conn = await factory.connected(1)
        link.submit(envelope(1))
        link.submit(envelope(2))
        for attempt in range(1, POISON_DROPS + 2):
            conn.drop(0x87 if attempt > 1 else None)
            conn = await factory.connected(attempt + 1)
        assert outcomes.seen == [(b"1", POISON)]
        assert conn.published[-1][2] == b"2"  # the stream goes on behind it


async def test_a_flapping_network_does_not_make_a_healthy_message_poison() -> None:
    factory, outcomes = Factory(), Outcomes()
    link = target_link(factory, outcomes, canary=True)
    async with running(link):
        conn = await factory.connected(1)
        link.submit(envelope(1))
        # The network cuts the connection right after the first PUBLISH, again and again.
        for attempt in range(1, POISON_DROPS + 3):
            conn.drop()
            conn = await factory.connected(attempt + 1)
            # The first PUBLISH on a new connection is the canary, not the suspect.
            assert [t for _, t, _ in conn.published] == [b"probe"]
        link.on_puback(conn, 1, 0)  # the network heals: the canary is answered
        assert [p for _, _, p in conn.published] == [b"", b"1"]
        link.on_puback(conn, 2, 0)
        assert outcomes.seen == [(b"1", DELIVERED)]


async def test_with_a_canary_a_real_poison_message_is_still_found() -> None:
    factory, outcomes = Factory(), Outcomes()
    link = target_link(factory, outcomes, canary=True)
    async with running(link):
        conn = await factory.connected(1)
        link.submit(envelope(1))
        conn.drop()  # in flight when the connection broke: probe it
        for attempt in range(2, POISON_DROPS + 2):
            conn = await factory.connected(attempt)
            link.on_puback(conn, 1, 0)  # the canary goes through...
            assert conn.published[-1][2] == b"1"
            conn.drop()  # ...and the suspect breaks the connection
        await factory.connected(POISON_DROPS + 2)
        assert outcomes.seen == [(b"1", POISON)]


async def test_expired_messages_are_not_sent() -> None:
    factory, outcomes = Factory(), Outcomes()
    link = target_link(factory, outcomes)
    async with running(link):
        conn = await factory.connected(1)
        link.submit(envelope(1, expires_at=asyncio.get_running_loop().time() - 1))
        assert outcomes.seen == [(b"1", EXPIRED)]
        assert conn.published == []


async def test_source_link_acknowledges_in_arrival_order_and_detaches_on_loss() -> None:
    factory = Factory(failures=1)
    flow, stats = Flow(100, 1 << 20), Stats(["r"])
    taken: list[tuple[AckQueue, Pending]] = []

    def handler(acks: AckQueue, msg: Publish) -> bool:
        assert flow.try_admit(len(msg.payload))
        taken.append((acks, acks.admit(msg.packet_id, msg.qos, len(msg.payload), 0)))
        return True

    link = SourceLink(
        0, ENDPOINT, OPTIONS, [("$share/g/a/#", 1)], None, 0.0, flow, handler, 1.0, stats,
        factory=factory,
    )  # fmt: skip
    async with running(link):
        conn = await factory.connected(2)
        await asyncio.sleep(0.01)
        assert conn.subscribed == [[("$share/g/a/#", 1)]]
        assert link.stats().up
        for pid in (11, 12, 13):
            assert link.on_message(conn, Publish("a/b", b"x", 1, False, False, pid, None))
        taken[2][1].finish()
        taken[0][1].finish()
        assert conn.pubacks == [11]  # 13 waits for 12
        taken[1][1].finish()
        assert conn.pubacks == [11, 12, 13]
        assert stats.acknowledged == 3
        assert flow.messages == 0
        assert link.on_message(conn, Publish("a/b", b"x", 1, False, False, 14, None))
        conn.drop()
        taken[3][1].finish()  # finished after the loss: the broker redelivers it
        assert conn.pubacks == [11, 12, 13]
        assert stats.abandoned == 1
        assert not link.stats().up


def test_puback_outcomes() -> None:
    assert puback_outcome(0) is DELIVERED
    assert puback_outcome(0x10) is DELIVERED  # no matching subscribers is still a success
    assert puback_outcome(0x97) is None  # quota: retry slower
    assert puback_outcome(0x87) == Outcome(Kind.REJECTED, 0x87)
    reason, label = Outcome.rejected(0x87).dead_letter_reason(POISON_DROPS)
    assert label == "rejected_0x87"
    assert "not authorized" in reason


@pytest.mark.parametrize(
    ("reason", "inflight", "probing", "age", "by_us", "strike"),
    [
        (None, 1, True, 0.1, False, True),  # the lone probe broke it
        (0x87, 1, True, 0.1, False, True),
        (0x97, 1, True, 0.1, False, False),  # throttling is the server's business
        (0x8E, 1, True, 0.1, False, False),  # so is a takeover
        (None, 2, True, None, False, False),  # not isolated
        (None, 1, False, 0.1, False, False),  # not probing yet
        (None, 1, True, 30.0, False, False),  # too late to be its answer
        (None, 1, True, 0.1, True, False),  # we closed it (keepalive)
    ],
)
def test_blame_only_an_isolated_probe(
    reason: int | None, inflight: int, probing: bool, age: float | None, by_us: bool, strike: bool
) -> None:
    response = on_connection_lost(
        reason, inflight=inflight, probing=probing, lone_age=age, closed_by_us=by_us
    )
    assert response.strike is strike
    assert response.probe  # anything in flight, or already probing: go one at a time


def test_drop_responses() -> None:
    quiet = on_connection_lost(None, inflight=0, probing=False, lone_age=None, closed_by_us=False)
    assert not (quiet.probe)
    assert not (quiet.strike)
    assert not (quiet.throttle)
    assert not (quiet.shrink_window)
    assert on_connection_lost(
        0x93, inflight=0, probing=False, lone_age=None, closed_by_us=False
    ).shrink_window
    assert on_connection_lost(
        0x97, inflight=0, probing=False, lone_age=None, closed_by_us=False
    ).throttle


def test_when_full_is_a_named_policy() -> None:
    flow = Flow(1, 1024)
    assert flow.try_admit(10)
    assert not flow.try_admit(10)
    assert flow.when_full(1) is WhenFull.BLOCK  # never drop QoS 1
    assert flow.when_full(0) is WhenFull.DROP
    assert Flow(1, 1024, qos0_when_full=WhenFull.BLOCK).when_full(0) is WhenFull.BLOCK


def test_backoff_grows_and_resets() -> None:
    backoff = Backoff(initial=1.0, cap=8.0)
    delays = [backoff.next_delay() for _ in range(6)]
    assert 0.5 <= delays[0] <= 1.0
    assert 4.0 <= delays[5] <= 8.0
    backoff.reset()
    assert backoff.next_delay() <= 1.0


# ---- peers that must not be used as they are ---------------------------------------------


def test_connack_violations_are_named() -> None:
    assert connack_violation({}) is None
    assert connack_violation({codec.RECEIVE_MAXIMUM: 1, codec.MAXIMUM_QOS: 0}) is None
    assert connack_violation({codec.RECEIVE_MAXIMUM: 0}) == (
        "the broker announced Receive Maximum 0, a protocol error",
        "receive_maximum_zero",
    )
    assert connack_violation({codec.MAXIMUM_QOS: 2}) == (
        "the broker announced Maximum QoS 2, a protocol error",
        "bad_maximum_qos",
    )


def test_qos_refusal_says_what_to_change() -> None:
    assert qos_refusal(1, 1) is None
    assert qos_refusal(0, 0) is None
    refusal = qos_refusal(0, 1)
    assert refusal is not None
    assert "set qos: 0 on those routes" in refusal


async def test_target_link_refuses_a_target_that_takes_only_qos_0() -> None:
    """At-least-once must not turn into fire-and-forget without a word."""
    outcomes = Outcomes()
    made: list[FakeConnection] = []

    def qos0_only(options: SessionOptions, listener: Listener) -> FakeConnection:
        made.append(FakeConnection(options, listener, max_qos=0))
        return made[-1]

    link = TargetLink(0, ENDPOINT, OPTIONS, 10, 1.0, Pacing(), outcomes, factory=qos0_only)
    async with running(link):
        link.submit(envelope(1))
        for _ in range(100):
            if len(made) >= 2:
                break
            await asyncio.sleep(0.01)
        assert not link.connected
        assert "accepts only QoS 0" in (link.stats().problem or "")
    assert all(conn.published == [] for conn in made)
    assert outcomes.seen == []  # nothing delivered, nothing acknowledged at the source
    # A route that asks for QoS 0 may use it.
    made.clear()
    link = TargetLink(
        0, ENDPOINT, OPTIONS, 10, 1.0, Pacing(), outcomes, factory=qos0_only, needed_qos=0
    )
    async with running(link):
        link.submit(envelope(1, qos=0))
        for _ in range(100):
            if outcomes.seen:
                break
            await asyncio.sleep(0.01)
    assert outcomes.seen == [(b"1", DELIVERED)]


async def test_a_link_with_connect_tries_gives_up() -> None:
    factory = Factory(failures=100)
    link = TargetLink(
        0, ENDPOINT, OPTIONS, 10, 1.0, Pacing(), Outcomes(), factory=factory, connect_tries=3
    )
    runner = asyncio.create_task(link.run())
    await asyncio.wait_for(link.failed.wait(), 10)
    await asyncio.wait_for(runner, 1)  # the loop ended
    assert len(factory.made) == 3
    assert str(link.gave_up) == "refused by the script (gave up after 3 tries)"
