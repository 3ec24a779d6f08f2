"""Path health and disaster recovery settings, and several source connections per worker.

AWS IoT Core caps every connection at 100 publishes/s in and out, so a worker that consumes
from it takes ``source.connections`` x 100/s only with several connections in the same share
groups. Configuration problems of the issue-12 keys are one precise line each.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bridge.config import BridgeConfig
from tests.conftest import Rig
from tests.harness import Collector, Publisher, check
from tests.test_config import BASE, run_check, with_, write


def _config(**changes: Any) -> BridgeConfig:
    return BridgeConfig(**with_(**changes))


# ---- configuration ---------------------------------------------------------------------


def test_source_connections_replicate_the_share_groups_only() -> None:
    routes = [
        {"source": "devices/+/telemetry", "share_group": "svc-a", "target": "dt/{1}/t"},
        {"source": "devices/+/status", "target": "dt/{1}/s"},  # plain: one connection only
    ]
    cfg = _config(routes=routes, source__connections=3)
    assert cfg.source_plan() == [
        [
            ("$share/svc-a/devices/+/telemetry", 1),
            ("devices/+/status", 1),
            ("mqtt-bridge/heartbeat/dtb/dtb-0", 0),  # QoS 0: nothing queues for a stopped worker
        ],
        [("$share/svc-a/devices/+/telemetry", 1)],
        [("$share/svc-a/devices/+/telemetry", 1)],
    ]
    assert [cfg.source_client_id(i) for i in range(cfg.source_connections)] == [
        "dtb-0-src",
        "dtb-0-src-1",
        "dtb-0-src-2",
    ]
    assert cfg.side_client_id("source", "hb") == "dtb-0-src-hb"
    assert cfg.side_client_id("target", "probe") == "dtb-0-tgt-probe"


def test_heartbeat_topics_follow_the_templates_and_the_brokers() -> None:
    cfg = _config()
    assert cfg.heartbeat_topics() == (
        "mqtt-bridge/heartbeat/dtb/dtb-0",
        "mqtt-bridge/heartbeat/dtb/dtb-0",
    )
    moved = _config(heartbeat={"target_topic": "dt/mqtt-bridge/{instance_id}"})
    assert moved.heartbeat_topics() == ("mqtt-bridge/heartbeat/dtb/dtb-0", "dt/mqtt-bridge/dtb-0")
    one_broker = _config(target__url="mqtt://127.0.0.1:1883")
    topics = one_broker.heartbeat_topics()
    assert topics is not None
    assert topics[1] == topics[0] + "/crossed"  # the reader must not see the original
    assert _config(heartbeat={"enabled": False}).heartbeat_topics() is None
    assert ("mqtt-bridge/heartbeat/dtb/dtb-0", 0) not in _config(
        heartbeat={"enabled": False}
    ).source_plan()[0]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"target__failover_urls": ["mqtts://dr.example.com:8883"]},
            "target: failover_urls[0]: 'mqtts://dr.example.com:8883' must use "
            "mqtt:// like url (one tls section serves every url)",
        ),
        (
            {"target__failover_urls": ["mqtt://127.0.0.1:1884"]},
            "target: failover_urls: each url must name a different host:port",
        ),
        (
            {"source__failover_urls": ["http://x"]},
            "source.failover_urls[0]: scheme must be mqtt:// or mqtts://, got 'http://x'",
        ),
        ({"target__failover_after": 0}, "target.failover_after: Input should be greater than 0"),
        (
            {"source__connections": 2, "routes": [{"source": "a/#"}]},
            "source.connections: 2 connections need a route with a share_group",
        ),
        (
            {"routes": [{"source": "#", "share_group": "g"}]},
            "routes[0].source: '#' also matches the heartbeat topic "
            "'mqtt-bridge/heartbeat/dtb/dtb-0': move heartbeat.topic out of the routes' way",
        ),
        (
            {"heartbeat": {"topic": "hb/{pod}"}},
            "heartbeat.topic: unknown placeholder {pod}: use {direction} or {instance_id}",
        ),
        ({"heartbeat": {"topic": "hb/+/x"}}, "heartbeat.topic: 'hb/+/x' is not a"),
        (
            {"heartbeat": {"interval": 5, "stale_after": 5}},
            "heartbeat: stale_after (5 s) must be longer than interval (5 s)",
        ),
        (
            {
                "target__limits": {"max_topic_slashes": 2},
                "heartbeat": {"target_topic": "a/b/c/{instance_id}"},
            },
            "heartbeat.target_topic: topic_too_deep: 3 slashes > 2",
        ),
        (
            {"source__limits": {"max_topic_bytes": 10}},
            "heartbeat.topic: topic_too_long",
        ),
        (
            {
                "target__url": "mqtt://127.0.0.1:1883",
                "heartbeat": {"target_topic": "mqtt-bridge/heartbeat/{direction}/{instance_id}"},
            },
            "heartbeat.target_topic: 'mqtt-bridge/heartbeat/dtb/dtb-0' is heartbeat.topic on "
            "the same broker: the reader would see heartbeats that never crossed the bridge",
        ),
    ],
)
def test_path_health_settings_fail_with_one_precise_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path, with_(**changes))
    code, out, err = run_check(capsys, path)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {path}: ")
    assert expected in err, err
    assert "Traceback" not in err


def test_a_loop_through_the_heartbeat_topic_is_rejected_across_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dtb = write(tmp_path, with_(heartbeat={"target_topic": "cmd/hb/{instance_id}"}), "dtb.yaml")
    btd = write(
        tmp_path,
        with_(
            direction="btd",
            instance_id="btd-0",
            source__url="mqtt://127.0.0.1:1884",
            target__url="mqtt://127.0.0.1:1883",
            routes=[{"source": "cmd/+/#", "share_group": "btd", "target": "devices/{1}/cmd"}],
        ),
        "btd.yaml",
    )
    code, _, err = run_check(capsys, dtb, btd)
    assert code == 2
    assert (
        f"{dtb}: heartbeat.target_topic: 'cmd/hb/dtb-0' can match {btd} routes[0].source "
        "'cmd/+/#' on the same broker: messages would loop"
    ) in err


def test_failover_and_heartbeat_keys_are_settable_by_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BRIDGE_TARGET__FAILOVER_URLS", '["mqtt://dr-a:1883","mqtt://dr-b:1883"]')
    monkeypatch.setenv("BRIDGE_TARGET__FAILBACK_AFTER", "120")
    monkeypatch.setenv("BRIDGE_SOURCE__CONNECTIONS", "4")
    monkeypatch.setenv("BRIDGE_HEARTBEAT__INTERVAL", "2")
    monkeypatch.setenv("BRIDGE_HEARTBEAT__TARGET_TOPIC", "dt/hb/{instance_id}")
    cfg = BridgeConfig(**BASE)
    assert cfg.target.urls == ["mqtt://127.0.0.1:1884", "mqtt://dr-a:1883", "mqtt://dr-b:1883"]
    assert cfg.target.failback_after == 120
    assert cfg.source.connections == 4
    assert cfg.source_connections == 4
    assert cfg.heartbeat.interval == 2
    assert cfg.heartbeat_topics() == ("mqtt-bridge/heartbeat/dtb/dtb-0", "dt/hb/dtb-0")


# ---- a real broker ---------------------------------------------------------------------


def test_four_source_connections_in_one_share_group_all_consume(rig: Rig) -> None:
    worker = rig.worker(
        [{"source": f"{rig.prefix}/#", "share_group": "svc", "target": "out/{1}"}],
        source={"connections": 4},
    )
    topics = [f"{rig.prefix}/dev{i}" for i in range(8)]
    with Collector(rig.target.url, "out/#") as collector, Publisher(rig.source.url) as pub:
        pub.publish_numbered(topics, 2000)
        pub.wait_acked()
        collector.wait_for(2000, 60)
        report = check(pub.acked(), collector.messages, lambda t: "out/" + t.split("/", 1)[1])
    assert report.lost == 0, report
    assert report.unexpected == 0, report
    m = worker.metrics()
    taken = [m[f"connection_received{{connection={i}}}"] for i in range(4)]
    assert all(n > 0 for n in taken), taken  # the broker spread the group over all four
    assert sum(taken) == m["received"] == m["acknowledged"]
    assert all(m[f"connected{{connection={i},side=source}}"] == 1 for i in range(4))
    # The broker's own log: four connections with distinct, stable client ids.
    broker_log = rig.source.log.read_text()
    seen = set(re.findall(r"New client connected from \S+ as (w-0-src\S*) ", broker_log))
    assert seen == {"w-0-src", "w-0-src-1", "w-0-src-2", "w-0-src-3", "w-0-src-hb"}
