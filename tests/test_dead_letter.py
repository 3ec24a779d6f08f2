"""Promise 3 (message half): what the target refuses is dead-lettered, counted, and the
stream keeps flowing."""

from __future__ import annotations

import signal
import time

from tests.conftest import Rig
from tests.harness import Collector, Mosquitto, Publisher, Worker, bridge_config, check, wait_until


def test_target_rejection_is_dead_lettered_and_the_stream_flows(rig: Rig) -> None:
    # Mosquitto 2.0 answers a denied MQTT 5 publish with PUBACK 0x87 and then drops the
    # connection; the reset may swallow the PUBACK. Either way the message must end up
    # dead-lettered (reason 0x87, or the poison-message detection) and the rest flow.
    acl = rig.tmp / "acl"
    acl.write_text("topic deny out/denied/#\ntopic readwrite #\n")
    with Mosquitto(rig.tmp, "strict-target", extra=f"acl_file {acl}") as target:
        routes = [{"source": f"{rig.prefix}/#", "target": "out/{1}"}]
        worker = Worker(rig.tmp, bridge_config(rig.source.url, target.url, routes))
        rig.workers.append(worker.start())
        topics = [f"{rig.prefix}/ok/a", f"{rig.prefix}/denied/b", f"{rig.prefix}/ok/c"]
        with Collector(target.url, "out/#") as collector, Publisher(rig.source.url) as pub:
            pub.publish_numbered(topics, 60)
            pub.wait_acked()
            collector.wait_for(40, 60)
            time.sleep(0.5)
            acked = pub.acked()
            dead = [(topics[1], n) for n in acked[topics[1]]]
            report = check(acked, collector.messages, lambda t: "out/" + t.split("/", 1)[1], dead)
    assert report.lost == 0, report.lost_examples
    assert report.unexpected == 0
    assert report.delivered == 40 + report.duplicated
    metrics = worker.metrics()
    route = f"{rig.prefix}/#"
    by_reason = {
        reason: metrics[f"dead_lettered{{reason={reason},route={route}}}"]
        for reason in ("rejected_0x87", "connection_dropped")
    }
    assert sum(by_reason.values()) == 20, by_reason
    assert metrics["acknowledged"] == 60
    assert metrics["inflight_messages"] == 0
    log = worker.log_tail(200_000)
    assert log.count('"event":"message.dead_lettered"') == 20
    assert f"{rig.prefix}/denied/b|" not in log  # never a payload in the logs


def test_qos0_beyond_the_bound_is_dropped_and_counted(rig: Rig) -> None:
    routes = [{"source": f"{rig.prefix}/#", "qos": 0}]
    # Freshness over delivery: `drop` (the default, block, is in test_backpressure.py).
    worker = rig.worker(routes, flow={"max_inflight": 20, "qos0_when_full": "drop"})
    assert rig.target.proc is not None
    with Publisher(rig.source.url) as pub:
        rig.target.proc.send_signal(signal.SIGSTOP)  # the target stops reading
        try:
            # Big payloads fill the frozen target's socket, so the window fills up.
            pub.publish_numbered([f"{rig.prefix}/a"], 3000, qos=0, size=64 * 1024)
            time.sleep(1.0)
            wait_until(
                lambda: worker.metrics()["received"] + worker.metrics()["dropped"] >= 3000,
                30,
                what="every QoS 0 message received or dropped",
            )
        finally:
            rig.target.proc.send_signal(signal.SIGCONT)
    metrics = worker.metrics()
    assert metrics[f"dropped{{reason=full,route={rig.prefix}/#}}"] > 0
    assert metrics["received"] + metrics["dropped"] == 3000
    assert worker.inflight_peak() <= 20
