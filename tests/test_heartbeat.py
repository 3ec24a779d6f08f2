"""The end-to-end heartbeat: /readyz means "messages flow", not "connected".

In-process: what the heartbeat makes of each stage a heartbeat reaches (pure diagnosis,
and the bookkeeping the bridge reports to). Real Mosquitto: a target frozen with SIGSTOP
keeps its TCP connections open, and only the heartbeat notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import orjson
import pytest

from bridge import mqtt_codec as codec
from bridge.flow import Flow
from bridge.heartbeat import (
    MAX_CARRIED,
    Beat,
    Heartbeat,
    Publisher,
    Reader,
    Stage,
    Topics,
    diagnose,
)
from bridge.mqtt import Endpoint, SessionOptions
from bridge.outcome import DELIVERED, Outcome
from bridge.source import SourceLink
from bridge.stats import Stats
from tests.conftest import Rig
from tests.fakes import FakeTarget
from tests.harness import Collector, Mosquitto, Worker, bridge_config, check, wait_until
from tests.harness import Publisher as Client
from tests.test_links import FakeConnection

TOPICS = Topics("mqtt-bridge/heartbeat/dtb/w-0", "hb/w-0")


# ---- the diagnosis (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "problem", "says"),
    [
        (Stage.SENT, None, "heartbeat 2 (sent 3.0 s ago) was not acknowledged by the source"),
        (Stage.PUBLISHED, None, "never reached the bridge (its subscription to "),
        (Stage.TAKEN, None, "reached the bridge; the target has not acknowledged it"),
        (Stage.FORWARDED, None, "acknowledged by the target but never delivered to the reader"),
        (Stage.TAKEN, "was refused by the target (x)", "heartbeat 2 (sent 3.0 s ago) was refused"),
    ],
)
def test_the_diagnosis_names_the_stage_where_the_oldest_missing_heartbeat_stopped(
    stage: Stage, problem: str | None, says: str
) -> None:
    beats = [
        Beat(1, 0.0, Stage.READ),
        Beat(2, 7.0, stage, problem),
        Beat(3, 9.0, Stage.SENT),  # newer ones are not the first to go missing
    ]
    assert says in diagnose(beats, 10.0, publisher_up=True, reader_up=True, topics=TOPICS)


def test_the_diagnosis_names_a_missing_connection_first() -> None:
    beats = [Beat(1, 0.0, Stage.TAKEN)]
    assert "publisher is not connected to the source" in diagnose(beats, 1, False, True, TOPICS)
    assert "reader is not subscribed to 'hb/w-0'" in diagnose(beats, 1, True, False, TOPICS)
    assert "no heartbeat was sent" in diagnose([Beat(1, 0.0, Stage.READ)], 1, True, True, TOPICS)
    assert "no heartbeat has been sent yet" in diagnose([], 1, True, True, TOPICS)


# ---- the bookkeeping, in-process -------------------------------------------------------


def _heartbeat(stale_after: float = 5.0) -> tuple[Heartbeat, FakeConnection]:
    hb = Heartbeat(TOPICS, 1.0, stale_after, "dtb", "w-0")
    options = SessionOptions("w-0-src-hb", codec.PROTOCOL_5, clean_start=True)
    publisher = Publisher(hb, Endpoint("source", 1), options, 1.0, 0.0, FakeConnection, None)
    reader = Reader(hb, Endpoint("target", 1), options, 1.0, 0.0, FakeConnection, None)
    hb.attach(publisher, reader, lambda: True, lambda: True)
    conn = FakeConnection(options, publisher)
    publisher.conn = reader.conn = conn  # type: ignore[assignment]
    return hb, conn


async def test_a_heartbeat_is_fresh_once_it_crossed_and_stale_after_stale_after() -> None:
    hb, conn = _heartbeat(stale_after=0.2)
    assert not hb.fresh
    assert hb.state()["problem"].startswith("no heartbeat crossed yet")
    hb.send()
    pid, topic, payload = conn.published[0]
    assert topic == TOPICS.source.encode()
    assert orjson.loads(payload)["seq"] == 1
    hb.published(pid, 0)
    assert hb.take(payload)
    hb.forwarded(payload, DELIVERED)
    hb.read_back(payload)
    assert hb.fresh
    state = hb.state()
    assert state["fresh"]
    assert state["latency"] is not None
    assert "problem" not in state
    assert sum(hb.latency_counts) == 1
    hb.send()
    await asyncio.sleep(0.3)
    state = hb.state()
    assert not state["fresh"]
    assert state["problem"].startswith("no heartbeat crossed for ")
    assert "heartbeat 2" in state["problem"]
    assert "not acknowledged by the source broker" in state["problem"]


async def test_the_bridge_carries_a_bounded_number_of_heartbeats_once_each() -> None:
    hb, conn = _heartbeat()
    for _ in range(MAX_CARRIED + 2):
        hb.send()
    payloads = [payload for _, _, payload in conn.published]
    assert [hb.take(p) for p in payloads] == [True] * MAX_CARRIED + [False, False]
    assert hb.counts["skipped"] == 2  # a hung target cannot make them pile up
    assert not hb.take(payloads[0])  # a redelivered copy is not carried twice
    assert hb.counts["duplicate"] == 1
    hb.forwarded(payloads[0], DELIVERED)
    hb.send()
    assert hb.take(conn.published[-1][2])  # room again for a new one
    other = orjson.dumps({"nonce": "someone-else", "seq": 1})
    assert not hb.take(other)  # another process under our instance_id
    hb.read_back(other)
    assert hb.counts["foreign"] == 2


async def test_a_refused_heartbeat_pauses_the_next_ones() -> None:
    hb, conn = _heartbeat()
    hb.send()
    hb.send()
    first, second = (payload for _, _, payload in conn.published)
    assert hb.take(first)
    hb.forwarded(first, Outcome.rejected(0x87))
    assert hb.counts["refused"] == 1
    assert not hb.take(second)  # a broker that refuses by disconnecting is left alone
    assert "was refused by the target (rejected: not authorized (0x87))" in hb.state()["problem"]


# ---- real brokers ----------------------------------------------------------------------


def test_a_frozen_target_turns_readyz_503_and_back(rig: Rig) -> None:
    stale_after = 3.0
    worker = rig.worker(
        [{"source": f"{rig.prefix}/#", "target": "out/{1}"}],
        heartbeat={"interval": 0.5, "stale_after": stale_after},
    )
    status, state = worker.readyz()
    assert status == 200
    assert state["heartbeat"]["fresh"]
    topics = [f"{rig.prefix}/a", f"{rig.prefix}/b"]
    target = rig.target.proc
    assert target is not None
    with Collector(rig.target.url, "out/#") as collector, Client(rig.source.url) as pub:
        pub.publish_numbered(topics, 100)
        pub.wait_acked()
        collector.wait_for(100, 30)
        target.send_signal(signal.SIGSTOP)  # TCP stays open; keepalive (60 s) far away
        try:
            frozen = time.monotonic()
            wait_until(
                lambda: worker.readyz()[0] == 503, stale_after + 5, what="/readyz 503 (frozen)"
            )
            detected = time.monotonic() - frozen
            status, state = worker.readyz()
            # Connected and subscribed: the old readiness would still say 200.
            assert state["source_subscribed"] is True
            assert state["target_connected"] == [True]
            problem = state["heartbeat"]["problem"]
            assert problem.startswith("no heartbeat crossed for"), problem
            assert (
                "the target has not acknowledged it" in problem
                or "acknowledged by the target but never delivered" in problem
            ), problem
            assert worker.metrics()["ready"] == 0
            for n in range(50, 100):  # traffic meanwhile waits; none of it may be lost
                for topic in topics:
                    pub.publish(topic, n)
            pub.wait_acked()
        finally:
            target.send_signal(signal.SIGCONT)
        thawed = time.monotonic()
        wait_until(worker.ready, 30, what="/readyz 200 after SIGCONT")
        recovered = time.monotonic() - thawed
        collector.wait_for(200, 30)
        report = check(pub.acked(), collector.messages, lambda t: "out/" + t.split("/", 1)[1])
    print(
        f"\nfrozen target: /readyz 503 after {detected:.2f} s (stale_after {stale_after:g} s, "
        f"interval 0.5 s); 200 again {recovered:.2f} s after SIGCONT"
    )
    assert report.lost == 0, report
    assert report.unexpected == 0, report
    m = worker.metrics()
    assert m["heartbeats{stage=received}"] > 0
    # Every heartbeat read back was timed once (a duplicate is not timed again).
    assert 0 < m["heartbeat_latency_seconds_count"] <= m["heartbeats{stage=received}"]
    assert m["heartbeat_age_seconds"] <= stale_after
    assert m["received"] == 200  # heartbeats are not traffic
    assert m["acknowledged"] == 200


def test_a_refused_heartbeat_is_named_not_dead_lettered_and_traffic_flows(rig: Rig) -> None:
    def decide(n: int, topic: str, payload: bytes) -> int:
        return 0x87 if topic.startswith("mqtt-bridge/heartbeat/") else 0

    with FakeTarget(decide) as fake:
        worker = rig.worker(
            [{"source": f"{rig.prefix}/#"}],
            target_url=fake.url,
            heartbeat={"interval": 0.5, "stale_after": 2},
            start=False,
        )
        worker.start(wait_ready=False)
        wait_until(
            lambda: worker.readyz()[1].get("source_subscribed"), 15, what="subscribed at the source"
        )
        with Client(rig.source.url) as pub:
            pub.publish_numbered([f"{rig.prefix}/a"], 100)
            pub.wait_acked()
        wait_until(lambda: len(fake.accepted) >= 100, 30, what="traffic accepted")
        wait_until(
            lambda: "refused by the target" in worker.readyz()[1]["heartbeat"].get("problem", ""),
            15,
            what="/readyz naming the refusal",
        )
        refused = worker.metrics()["heartbeats{stage=refused}"]
        time.sleep(1.5)  # three more intervals
        status, state = worker.readyz()
        m = worker.metrics()
        log = worker.log_tail(100_000)
    assert status == 503
    assert "rejected: not authorized (0x87)" in state["heartbeat"]["problem"]
    assert "heartbeat.target_topic" in state["heartbeat"]["problem"]  # what to change
    assert m["heartbeats{stage=refused}"] == refused  # paused: no refusal every interval
    assert m["heartbeats{stage=skipped}"] >= 2
    assert m["dead_lettered"] == 0
    assert m["received"] == m["acknowledged"] == 100
    assert m["connection_published{connection=0}"] == 100
    assert log.count('"event":"heartbeat.refused"') == 1


def test_a_source_acl_that_denies_the_heartbeat_stops_readiness_not_traffic(rig: Rig) -> None:
    acl = rig.tmp / "acl"
    acl.write_text("topic deny mqtt-bridge/heartbeat/#\ntopic readwrite #\n")
    with Mosquitto(rig.tmp, "strict-source", extra=f"acl_file {acl}") as source:
        cfg = bridge_config(
            source.url,
            rig.target.url,
            [{"source": f"{rig.prefix}/#", "target": "out/{1}"}],
            heartbeat={"interval": 0.5, "stale_after": 2},
        )
        worker = Worker(rig.tmp, cfg)
        rig.workers.append(worker.start(wait_ready=False))
        wait_until(
            lambda: worker.readyz()[1].get("source_subscribed"), 15, what="subscribed at the source"
        )
        with Collector(rig.target.url, "out/#") as collector, Client(source.url) as pub:
            pub.publish_numbered([f"{rig.prefix}/a"], 100)
            pub.wait_acked()
            collector.wait_for(100, 30)
            report = check(pub.acked(), collector.messages, lambda t: "out/" + t.split("/", 1)[1])
        wait_until(
            lambda: "source broker" in worker.readyz()[1]["heartbeat"].get("problem", ""),
            15,
            what="/readyz naming the source broker",
        )
        status, state = worker.readyz()
    assert report.lost == 0, report
    assert status == 503
    assert "source broker" in state["heartbeat"]["problem"], state


@pytest.mark.parametrize("optional", [True, False])
async def test_a_refused_heartbeat_subscription_does_not_fail_the_source_connection(
    optional: bool,
) -> None:
    """AWS IoT Core refuses a SUBSCRIBE its policy denies (SUBACK 0x87): for the
    heartbeat's filter that must cost readiness, not the traffic's subscriptions."""
    heartbeat = "mqtt-bridge/heartbeat/btd/btd-0"
    made: list[FakeConnection] = []

    class Refusing(FakeConnection):
        async def subscribe(
            self, filters: list[tuple[str, int]], retain_as_published: bool, timeout: float = 10
        ) -> list[int]:
            self.subscribed.append(filters)
            return [0x87 if f == heartbeat else 1 for f, _ in filters]

    def factory(options: SessionOptions, listener: Any) -> FakeConnection:
        made.append(Refusing(options, listener))
        return made[-1]

    options = SessionOptions("btd-0-src", codec.PROTOCOL_5, clean_start=False)
    link = SourceLink(
        0, Endpoint("iot", 8883), options, [("$share/btd/cmd/+/set", 1), (heartbeat, 0)], None,
        0.0, Flow(10, 1 << 20), lambda acks, msg: True, 1.0, Stats(["r"]), factory=factory,
        optional=frozenset({heartbeat} if optional else ()),
    )  # fmt: skip
    runner = asyncio.create_task(link.run())
    try:
        for _ in range(100):
            if link.subscribed or len(made) > 1:
                break
            await asyncio.sleep(0.01)
        assert link.subscribed is optional
        assert (len(made) == 1) is optional  # refused for real: the connection is retried
    finally:
        link.stop_taking()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
