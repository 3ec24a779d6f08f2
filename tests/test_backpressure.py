"""Promise 2: bounded memory and real backpressure while the target is down."""

from __future__ import annotations

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
