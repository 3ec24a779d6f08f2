"""Failover targets: the pure policy, a link following it in-process, and real Mosquitto
primaries and secondaries that go away and come back (oracle: lost = 0)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge import mqtt_codec as codec
from bridge.acks import Pending
from bridge.errors import ConnectionFailed
from bridge.failover import FAILBACK, FAILOVER, Failover, Move
from bridge.message import Envelope
from bridge.mqtt import Endpoint, Listener, SessionOptions
from bridge.mqtt_codec import Publish
from bridge.outcome import DELIVERED, Outcome
from bridge.pacing import Pacing
from bridge.target import TargetLink
from tests.conftest import Rig
from tests.harness import Collector, Mosquitto, Publisher, Worker, check, wait_until

PRIMARY, SECONDARY, TERTIARY = (Endpoint(name, 1883) for name in ("primary", "dr", "third"))


# ---- the policy (pure) ---------------------------------------------------------------


def test_moves_after_failover_after_seconds_of_failed_connects() -> None:
    fo = Failover("target", [PRIMARY, SECONDARY], failover_after=5, failback_after=60)
    assert fo.dial() == (0, PRIMARY)
    assert fo.failed(0, started=0.0, now=0.1) is None
    assert fo.failed(0, started=1.0, now=4.9) is None  # counted from the first attempt
    assert fo.retry_delay(8.0, now=4.9) == pytest.approx(0.1)  # retry when the move is due
    move = fo.failed(0, started=5.0, now=5.1)
    assert move == Move("target", PRIMARY, SECONDARY, FAILOVER)
    assert fo.dial() == (1, SECONDARY)
    assert fo.moves[FAILOVER] == 1
    # A late failure of a connect to the endpoint we left changes nothing.
    assert fo.failed(0, started=4.0, now=6.0) is None
    assert fo.dial() == (1, SECONDARY)


def test_one_healthy_connection_proves_the_endpoint() -> None:
    fo = Failover("target", [PRIMARY, SECONDARY], failover_after=1)
    fo.connected(0)  # one link is up there
    assert fo.failed(0, started=0.0, now=100.0) is None  # another link's own trouble
    fo.lost(0)
    assert fo.failed(0, started=100.0, now=100.5) is None  # the clock starts now
    assert fo.failed(0, started=101.0, now=101.2) is not None


def test_a_success_restarts_the_clock() -> None:
    fo = Failover("source", [PRIMARY, SECONDARY], failover_after=5)
    assert fo.failed(0, started=0.0, now=4.0) is None
    fo.connected(0)
    fo.lost(0)
    assert fo.failed(0, started=6.0, now=7.0) is None  # not 7 s of failure: 1 s
    assert fo.retry_delay(10.0, now=7.0) == pytest.approx(4.0)


def test_round_robin_through_every_endpoint() -> None:
    fo = Failover("target", [PRIMARY, SECONDARY, TERTIARY], failover_after=1, failback_after=None)
    seen = []
    now = 0.0
    for _ in range(4):
        index, _endpoint = fo.dial()
        move = fo.failed(index, started=now, now=now + 1.5)
        assert move is not None
        seen.append((move.source.host, move.target.host))
        now += 2
    assert seen == [("primary", "dr"), ("dr", "third"), ("third", "primary"), ("primary", "dr")]


def test_a_single_endpoint_never_moves() -> None:
    fo = Failover("target", [PRIMARY], failover_after=1)
    assert fo.failed(0, started=0.0, now=1000.0) is None
    assert fo.retry_delay(3.0, now=1000.0) == 3.0
    assert not fo.needs_probe


def test_failback_only_after_failback_after_seconds_of_successful_probes() -> None:
    fo = Failover("target", [PRIMARY, SECONDARY], failover_after=1, failback_after=10)
    moved: list[tuple[str, int]] = []
    fo.on_move(lambda move: moved.append((move.reason, fo.active)))
    assert not fo.needs_probe  # on the primary: nothing to probe
    assert fo.failed(0, started=0.0, now=2.0) is not None
    fo.connected(1)  # healthy on the secondary
    assert fo.needs_probe
    assert fo.probed(False, now=3.0) is None
    assert fo.probed(True, now=4.0) is None  # healthy since 4
    assert fo.probed(True, now=13.0) is None  # 9 s: not yet
    assert fo.probed(False, now=13.5) is None  # one failure starts the count again
    assert fo.probed(True, now=14.0) is None
    assert fo.probed(True, now=23.0) is None
    assert fo.dial() == (1, SECONDARY)  # the healthy connection stays all along
    assert moved == [(FAILOVER, 1)]
    assert fo.probed(True, now=24.0) == Move("target", SECONDARY, PRIMARY, FAILBACK)
    assert fo.dial() == (0, PRIMARY)
    assert moved == [(FAILOVER, 1), (FAILBACK, 0)]  # links are told after the policy moved
    assert (fo.moves[FAILOVER], fo.moves[FAILBACK]) == (1, 1)
    assert (fo.probes["ok"], fo.probes["failed"]) == (5, 2)
    assert not fo.needs_probe


def test_failback_disabled_stays_on_the_failover_endpoint() -> None:
    fo = Failover("target", [PRIMARY, SECONDARY], failover_after=1, failback_after=None)
    assert fo.failed(0, started=0.0, now=2.0) is not None
    assert not fo.needs_probe
    assert fo.probed(True, now=1000.0) is None
    assert fo.dial() == (1, SECONDARY)


# ---- a target link following the policy, in-process -----------------------------------


@dataclass
class Net:
    """Which endpoints accept connections; every connection made, with its endpoint."""

    down: set[str] = field(default_factory=set)
    made: list[FakeConn] = field(default_factory=list)


@dataclass
class FakeConn:
    options: SessionOptions
    listener: Listener
    net: Net
    endpoint: Endpoint | None = None
    session_present: bool = False
    disconnect_reason: int | None = None
    disconnect_detail: str = ""
    ack_reason: str = ""
    max_qos: int = 1
    protocol_error: str | None = None
    closed_by_us: bool = False
    server_receive_maximum: int = 65535
    has_unread: bool = False
    last_rx: float = 0.0
    published: list[bytes] = field(default_factory=list)
    _pid: int = 0

    def __post_init__(self) -> None:
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.net.made.append(self)

    @property
    def is_open(self) -> bool:
        return not self._closed.done()

    async def connect(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        if endpoint.host in self.net.down:
            raise ConnectionFailed(f"cannot connect to {endpoint}")

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def disconnect(self, session_expiry: int | None = None, timeout: float = 2.0) -> None:
        self.drop()

    def abort(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    def drop(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
            self.listener.on_connection_lost(self, None)  # type: ignore[arg-type]

    def publish(
        self, topic: bytes, payload: bytes, qos: int, retain: bool, props: Any = None
    ) -> int:
        self._pid += 1
        self.published.append(payload)
        return self._pid

    def puback(self, packet_id: int) -> None:
        pass

    async def subscribe(self, filters: Any, retain_as_published: bool, timeout: float = 10) -> Any:
        return [0] * len(filters)

    async def unsubscribe(self, filters: Any, timeout: float = 10) -> Any:
        return [0] * len(filters)

    def resume(self) -> None:
        pass

    def stop_reading(self) -> None:
        pass


def _envelope(n: int) -> Envelope:
    payload = str(n).encode()
    return Envelope(
        source_topic="t", topic=b"t", payload=payload, qos=1, retain=False, properties=None,
        received_at=0.0, expires_at=None, route=0, pending=Pending(n, 1, 1, 0, lambda p: None),
        source=Publish("t", payload, 1, False, False, n, None), received_epoch=0.0,
    )  # fmt: skip


async def _until(predicate: Any, what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_a_target_link_fails_over_republishes_and_fails_back() -> None:
    net = Net(down={"primary"})
    fo = Failover("target", [PRIMARY, SECONDARY], failover_after=0.3, failback_after=1)
    done: list[tuple[bytes, Outcome]] = []
    options = SessionOptions(client_id="w-0-tgt-0", protocol=codec.PROTOCOL_5, clean_start=True)

    def factory(opts: SessionOptions, listener: Listener) -> FakeConn:
        return FakeConn(opts, listener, net)

    link = TargetLink(
        0, PRIMARY, options, 10, 1.0, Pacing(), lambda e, o: done.append((e.payload, o)),
        factory=factory, failover=fo,
    )  # fmt: skip
    runner = asyncio.create_task(link.run())
    try:
        link.submit(_envelope(1))
        link.submit(_envelope(2))
        await _until(lambda: link.connected, "connected to the secondary")
        dr = net.made[-1]
        assert dr.endpoint == SECONDARY
        assert all(c.endpoint == PRIMARY for c in net.made[:-1])  # tried the primary first
        assert fo.moves[FAILOVER] == 1
        assert dr.published == [b"1", b"2"]
        link.on_puback(dr, 1, 0)  # 2 stays in flight
        net.down.clear()  # the primary is back: only a proven primary is worth a move
        assert fo.probed(True, now=0.0) is None
        assert link.conn is dr
        assert fo.probed(True, now=1.0) is not None  # proven for failback_after
        await _until(lambda: link.conn is not None and link.conn is not dr, "back on primary")
        back = net.made[-1]
        assert back.endpoint == PRIMARY
        assert back.published == [b"2"]  # what was in flight on the secondary, republished
        link.on_puback(back, 1, 0)
        assert done == [(b"1", DELIVERED), (b"2", DELIVERED)]
    finally:
        await link.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


# ---- DNS: a name is resolved on every connect ----------------------------------------


async def test_the_host_name_is_resolved_again_on_every_connect(tmp_path: Any) -> None:
    """Route 53 failover changes what a name resolves to; the bridge must follow. Two
    real brokers listen on one port at 127.0.0.1 and 127.0.0.2; a resolver we control
    plays DNS (the one thing a test cannot change on the machine)."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))  # a port free on every address
        port = probe.getsockname()[1]
    first = Mosquitto(tmp_path, "region-a", port=port).start()
    second = Mosquitto(tmp_path, "region-b", extra=f"listener {port} 127.0.0.2").start()
    answers = {"iot.example.test": "127.0.0.1"}
    asked: list[str] = []
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo

    async def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(str(host))
        return await real_getaddrinfo(answers.get(host, host), *args, **kwargs)

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
    done: list[Outcome] = []
    options = SessionOptions(client_id="dns-tgt-0", protocol=codec.PROTOCOL_5, clean_start=True)
    link = TargetLink(
        0, Endpoint("iot.example.test", port), options, 10, 2.0, Pacing(),
        lambda e, o: done.append(o),
    )  # fmt: skip
    runner = asyncio.create_task(link.run())
    try:
        with Collector(first.url, "t/#") as at_a:
            await _until(lambda: link.connected, "connected")
            link.submit(_envelope(1))
            await _until(lambda: len(done) == 1, "first delivery")
            await asyncio.to_thread(at_a.wait_for, 1, 10)
        assert [m.payload for m in at_a.messages] == [b"1"]
        answers["iot.example.test"] = "127.0.0.2"  # the health check flipped the record
        await asyncio.to_thread(first.stop)
        with Collector(second.url, "t/#") as at_b:
            link.submit(_envelope(2))
            await _until(lambda: len(done) == 2, "delivery after the DNS change")
            await asyncio.to_thread(at_b.wait_for, 1, 10)
        assert [m.payload for m in at_b.messages] == [b"2"]
        assert asked.count("iot.example.test") >= 2  # asked again, never cached
    finally:
        await link.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        del loop.getaddrinfo
        second.stop()
        first.stop()


# ---- real brokers ----------------------------------------------------------------------


def _moves(worker: Worker, side: str, reason: str) -> float:
    return worker.metrics().get(f"failovers{{reason={reason},side={side}}}", 0.0)


def _active(worker: Worker, side: str) -> int:
    m = worker.metrics()
    (index,) = [
        int(key.split("index=")[1].split(",")[0])
        for key, value in m.items()
        if key.startswith("endpoint_active{") and f"side={side}" in key and value == 1
    ]
    return index


@contextlib.contextmanager
def _stopwatch() -> Any:
    started = time.monotonic()
    yield lambda: round(time.monotonic() - started, 2)


def test_primary_target_stopped_traffic_moves_to_the_secondary_and_back(rig: Rig) -> None:
    primary = rig.target
    with Mosquitto(rig.tmp, "dr-target") as secondary:
        worker = rig.worker(
            [{"source": f"{rig.prefix}/#", "target": "out/{1}"}],
            target={"failover_urls": [secondary.url], "failover_after": 2, "failback_after": 3},
            heartbeat={"interval": 0.5, "stale_after": 4},
        )
        topics = [f"{rig.prefix}/dev{i}" for i in range(4)]
        with (
            Collector(primary.url, "out/#", client_id="backend-primary") as at_primary,
            Collector(secondary.url, "out/#", client_id="backend-dr") as at_secondary,
            Publisher(rig.source.url) as pub,
        ):
            publishing = pub.publish_in_background(topics, 4000, rate=150)
            wait_until(lambda: at_primary.count() > 300, 30, what="traffic on the primary")
            primary.stop()
            with _stopwatch() as elapsed:
                wait_until(lambda: _moves(worker, "target", "failover") == 1, 30, what="failover")
                moved_after = elapsed()
                wait_until(lambda: at_secondary.count() > 0, 30, what="traffic on the secondary")
                flowing_after = elapsed()
                wait_until(worker.ready, 30, what="ready on the secondary")
                ready_after = elapsed()
            print(
                f"\nfailover: moved {moved_after} s, first message on the secondary "
                f"{flowing_after} s, ready {ready_after} s after the primary stopped"
            )
            assert _active(worker, "target") == 1
            # The primary is down: probes fail and the healthy secondary is kept.
            wait_until(
                lambda: worker.metrics()["failback_probes{result=failed,side=target}"] >= 2,
                30,
                what="failed probes of the stopped primary",
            )
            assert _moves(worker, "target", "failback") == 0
            assert _active(worker, "target") == 1
            primary.start()  # same port and persistence: the backend's session is back
            with _stopwatch() as elapsed:
                wait_until(lambda: _moves(worker, "target", "failback") == 1, 60, what="failback")
                print(f"failback: {elapsed()} s after the primary came back (failback_after 3 s)")
            m = worker.metrics()
            assert m["failback_probes{result=ok,side=target}"] >= 2  # proven, then moved
            assert _active(worker, "target") == 0
            settled = at_primary.count()
            wait_until(lambda: at_primary.count() > settled + 50, 30, what="traffic on primary")
            publishing.join()
            pub.wait_acked()
            wait_until(
                lambda: worker.metrics()["acknowledged"] >= 4000, 60, what="all acknowledged"
            )
            at_primary.wait_for(at_primary.count() + 1, 5, stall=2)
            everything = at_primary.messages + at_secondary.messages
            report = check(pub.acked(), everything, lambda t: "out/" + t.split("/", 1)[1])
    assert report.lost == 0, report
    assert report.unexpected == 0, report
    # Each broker saw its share in order (a topic sticks to one connection, republished in order).
    for collector in (at_primary, at_secondary):
        per_broker = check(pub.acked(), collector.messages, lambda t: "out/" + t.split("/", 1)[1])
        assert per_broker.out_of_order == 0, per_broker
    log = worker.log_tail(500_000)
    assert log.count('"event":"failover.moved"') == 2
    assert '"reason":"failback"' in log


def test_primary_source_stopped_the_worker_consumes_from_the_secondary(rig: Rig) -> None:
    with Mosquitto(rig.tmp, "dr-source") as secondary:
        worker = rig.worker(
            [{"source": f"{rig.prefix}/#", "target": "out/{1}"}],
            source={"failover_urls": [secondary.url], "failover_after": 1, "failback_after": None},
            heartbeat={"interval": 0.5, "stale_after": 4},
        )
        topic = f"{rig.prefix}/dev"
        with Collector(rig.target.url, "out/#") as collector:
            with Publisher(rig.source.url) as on_primary:
                on_primary.publish_numbered([topic], 200)
                on_primary.wait_acked()
                collector.wait_for(200, 30)
            rig.source.stop()
            wait_until(lambda: _moves(worker, "source", "failover") == 1, 30, what="failover")
            wait_until(worker.ready, 30, what="ready: subscribed and heartbeat on the secondary")
            assert _active(worker, "source") == 1
            with Publisher(secondary.url) as on_secondary:
                for n in range(200, 400):
                    on_secondary.publish(topic, n)
                on_secondary.wait_acked()
                collector.wait_for(400, 30)
            acked = {topic: on_primary.acked()[topic] | on_secondary.acked()[topic]}
            report = check(acked, collector.messages, lambda t: "out/" + t.split("/", 1)[1])
    assert report.lost == 0, report
    assert report.unexpected == 0, report
    assert report.out_of_order == 0, report
    assert worker.metrics()["failovers{reason=failback,side=source}"] == 0  # disabled
