"""MQTT 3.1.1 and 5 on either side; property passthrough, retain, QoS, the loop marker."""

from __future__ import annotations

import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import Rig
from tests.harness import Collector, Publisher, Worker, bridge_config, check, wait_until

HOP = "mqtt-bridge-hop"


@pytest.mark.parametrize(("source_protocol", "target_protocol"), [("3.1.1", "5"), ("5", "3.1.1")])
def test_mixed_protocols_deliver_everything_mapped(
    rig: Rig, source_protocol: str, target_protocol: str
) -> None:
    routes = [{"source": f"{rig.prefix}/+/up", "share_group": "g", "target": "cloud/{1}"}]
    cfg = bridge_config(
        rig.source.url,
        rig.target.url,
        routes,
        source_protocol=source_protocol,
        target_protocol=target_protocol,
    )
    rig.workers.append(Worker(rig.tmp, cfg).start())
    topics = [f"{rig.prefix}/d{i}/up" for i in range(3)]
    with (
        Collector(rig.target.url, "cloud/#", protocol=target_protocol) as collector,
        Publisher(rig.source.url, protocol=source_protocol) as pub,
    ):
        pub.publish_numbered(topics, 900)
        pub.wait_acked()
        collector.wait_for(900, 30)
        report = check(pub.acked(), collector.messages, lambda t: "cloud/" + t.split("/")[1])
    assert report.lost == 0, report
    assert report.unexpected == 0, report
    assert report.out_of_order == 0, report
    assert all(m.qos == 1 for m in collector.messages)
    if target_protocol == "5":
        assert all((HOP, "w-0") in m.user_properties for m in collector.messages)


def _props(**values: object) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


@pytest.fixture
def v5_worker(rig: Rig) -> Worker:
    routes = [
        {"source": f"{rig.prefix}/keep/#", "target": "out/keep/{1}", "retain": True},
        {"source": f"{rig.prefix}/clear/#", "target": "out/clear/{1}", "retain": False},
        {"source": f"{rig.prefix}/q0/#", "target": "out/q0/{1}", "qos": 0},
        {"source": f"{rig.prefix}/#", "target": "out/rest/{1}", "name": "rest"},
    ]
    worker = Worker(rig.tmp, bridge_config(rig.source.url, rig.target.url, routes))
    rig.workers.append(worker.start())
    return worker


def test_mqtt5_properties_pass_through(rig: Rig, v5_worker: Worker) -> None:
    props = _props(
        UserProperty=[("trace", "abc"), ("trace", "def"), ("k", "v")],
        ContentType="application/json",
        PayloadFormatIndicator=1,
        ResponseTopic="reply/here",
        CorrelationData=b"\x00\x01corr",
        MessageExpiryInterval=3600,
    )
    with Collector(rig.target.url, "out/#") as collector, Publisher(rig.source.url) as pub:
        pub.publish(f"{rig.prefix}/dev/1", 0, properties=props)
        pub.publish(f"{rig.prefix}/dev/2", 0)  # no properties at all
        pub.wait_acked()
        wait_until(lambda: collector.count() >= 2, 10, what="2 delivered")
    by_topic = {m.topic: m for m in collector.messages}
    got = by_topic["out/rest/dev/1"]
    assert got.user_properties == [("trace", "abc"), ("trace", "def"), ("k", "v"), (HOP, "w-0")]
    assert got.properties["ContentType"] == "application/json"
    assert got.properties["PayloadFormatIndicator"] == 1
    assert got.properties["ResponseTopic"] == "reply/here"
    assert got.properties["CorrelationData"] == b"\x00\x01corr"
    assert 3590 <= got.properties["MessageExpiryInterval"] <= 3600, got.properties
    plain = by_topic["out/rest/dev/2"]
    assert plain.user_properties == [(HOP, "w-0")]
    assert "MessageExpiryInterval" not in plain.properties
    assert got.payload == f"{rig.prefix}/dev/1|0|".encode()


def test_retain_kept_or_cleared_per_route_and_qos_downgraded(rig: Rig, v5_worker: Worker) -> None:
    with Collector(rig.target.url, "out/#") as live, Publisher(rig.source.url) as pub:
        pub.publish(f"{rig.prefix}/keep/a", 0, retain=True)
        pub.publish(f"{rig.prefix}/clear/a", 0, retain=True)
        pub.publish(f"{rig.prefix}/q0/a", 0, qos=1)
        pub.publish(f"{rig.prefix}/q0/b", 0, qos=0)
        pub.wait_acked()
        wait_until(lambda: live.count() >= 4, 10, what="4 delivered")
    qos = {m.topic: m.qos for m in live.messages}
    assert qos["out/q0/a"] == 0
    assert qos["out/q0/b"] == 0
    assert qos["out/keep/a"] == 1
    # A new subscriber sees only what the target broker retained.
    with Collector(rig.target.url, "out/#", client_id="late") as late:
        time.sleep(1.0)
    assert [m.topic for m in late.messages if m.retain] == ["out/keep/a"]


def test_messages_carrying_the_hop_marker_are_dropped_and_counted(
    rig: Rig, v5_worker: Worker
) -> None:
    with Collector(rig.target.url, "out/#") as collector, Publisher(rig.source.url) as pub:
        pub.publish(f"{rig.prefix}/x", 0)
        pub.publish(f"{rig.prefix}/x", 1, properties=_props(UserProperty=[(HOP, "other-bridge")]))
        pub.publish(f"{rig.prefix}/x", 2)
        pub.wait_acked()
        wait_until(lambda: collector.count() >= 2, 10, what="2 delivered")
        time.sleep(0.5)
    assert [m.payload.split(b"|")[1] for m in collector.messages] == [b"0", b"2"]
    metrics = v5_worker.metrics()
    assert metrics["dropped{reason=loop,route=rest}"] == 1
    assert metrics["acknowledged"] == 3
    assert metrics["inflight_messages"] == 0
