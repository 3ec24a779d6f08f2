"""Promise 2: bounded memory and real backpressure while the target is down."""

from __future__ import annotations

import signal
import time

from tests.conftest import Rig
from tests.harness import Collector, Publisher, check, wait_until


def test_target_down_5s_loses_nothing_and_respects_max_inflight(rig: Rig) -> None:
    routes = [{"source": f"{rig.prefix}/#", "target": "out/{topic}"}]
    worker = rig.worker(routes, flow={"max_inflight": 200})
    topics = [f"{rig.prefix}/d{i}" for i in range(4)]
    # The collector's persistent session survives the target's restart (broker persistence).
    with (
        Collector(rig.target.url, "out/#", client_id="collector-outage") as collector,
        Publisher(rig.source.url) as pub,
    ):
        publishing = pub.publish_in_background(topics, 12_000, rate=1000)
        wait_until(lambda: pub.sent >= 2000 and collector.count() >= 500, 30, what="2000 sent")
        rig.target.stop()
        wait_until(lambda: not worker.ready(), 10, what="readiness to drop")
        time.sleep(5)
        during = worker.metrics()
        rig.target.start()
        wait_until(worker.ready, 30, what="readiness to return")
        publishing.join(60)
        pub.wait_acked(60)
        acked = pub.acked()
        collector.wait_for(12_000, 60)
        time.sleep(0.5)
        report = check(acked, collector.messages, lambda t: f"out/{t}")
    print(report)
    metrics = worker.metrics()
    assert report.lost == 0, report.lost_examples
    assert report.unexpected == 0
    assert report.out_of_order == 0
    # The backlog filled the window while the target was away, and never went beyond it.
    assert during["inflight_messages"] == 200
    assert worker.inflight_peak() == 200
    assert metrics["reconnects{connection=0,side=target}"] >= 1
    assert metrics["inflight_messages"] == 0


def test_qos0_blocks_when_full_and_keepalive_survives_a_30s_block(rig: Rig) -> None:
    # Default flow.qos0_when_full (block): a QoS 0 flood the target cannot take stops our
    # reading; the source broker's queue and TCP hold the rest, and nothing is dropped.
    routes = [{"source": f"{rig.prefix}/#", "target": "out/{topic}", "qos": 0}]
    worker = rig.worker(
        routes,
        flow={"max_inflight": 50},
        # 30 s is six source keepalives: the connection must live on PINGREQs alone while
        # no PUBLISH is read. The target's keepalive outlasts its freeze.
        source={"keepalive": 5},
        target={"keepalive": 120},
    )
    assert rig.target.proc is not None
    topics = [f"{rig.prefix}/d{i}" for i in range(4)]
    with (
        Collector(rig.target.url, "out/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        rig.target.proc.send_signal(signal.SIGSTOP)  # the target stops reading
        try:
            # Big payloads fill the frozen target's socket, so the flow fills up.
            pub.publish_numbered(topics, 3000, qos=0, size=8 * 1024)
            wait_until(lambda: worker.metrics()["inflight_messages"] == 50, 30, what="a full flow")
            time.sleep(30)
            during = worker.metrics()
        finally:
            rig.target.proc.send_signal(signal.SIGCONT)
        collector.wait_for(3000, 120)
        time.sleep(0.5)
        report = check(pub.acked(), collector.messages, lambda t: f"out/{t}")
    print(report)
    metrics = worker.metrics()
    assert during["inflight_messages"] == 50  # still blocked after 30 s, still bounded
    assert during["received"] < 3000  # the rest waited in the source broker, not in us
    assert report.expected == 3000
    assert report.lost == 0, report.lost_examples
    assert report.out_of_order == 0
    assert metrics["dropped"] == 0
    assert metrics["reconnects{connection=0,side=source}"] == 0
    assert metrics["reconnects{connection=0,side=target}"] == 0
    assert metrics["received"] == metrics["published"] == 3000
