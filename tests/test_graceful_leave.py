"""Promise 4: SIGTERM drains what is in flight, acknowledges it and exits 0 in time."""

from __future__ import annotations

import signal
import time

from bench.harness import Collector, Publisher, Worker, bridge_config, check, wait_until
from tests.conftest import Rig


def test_sigterm_with_backlog_exits_clean_without_loss_or_duplicates(rig: Rig) -> None:
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    deadline = 10.0
    a = Worker(
        rig.tmp,
        bridge_config(
            rig.source.url,
            rig.target.url,
            routes,
            instance_id="a",
            shutdown={"deadline": deadline},
            flow={"max_inflight": 300},
        ),
    )
    b = Worker(rig.tmp, bridge_config(rig.source.url, rig.target.url, routes, instance_id="b"))
    rig.workers += [a.start(), b.start()]
    topics = [f"{rig.prefix}/{i}" for i in range(4)]
    with (
        Collector(rig.target.url, f"{rig.prefix}/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        publishing = pub.publish_in_background(topics, 8000, rate=2000)
        wait_until(lambda: pub.sent >= 2000 and collector.count() >= 500, 30, what="2000 sent")
        # Freeze the target so that worker a holds a full window when told to leave.
        assert rig.target.proc is not None
        rig.target.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: a.metrics()["inflight_messages"] == 300, 30, what="a full window")
            started = time.monotonic()
            a.signal(signal.SIGTERM)
            time.sleep(1.0)
        finally:
            rig.target.proc.send_signal(signal.SIGCONT)
        code = a.wait(deadline + 5)
        took = time.monotonic() - started
        publishing.join(60)
        pub.wait_acked(60)
        acked = pub.acked()
        collector.wait_for(8000, 60)
        time.sleep(0.5)
        report = check(acked, collector.messages)
    print(report, f"exit={code} took={took:.2f}s")
    assert code == 0
    assert took < deadline
    assert report.lost == 0, report.lost_examples
    assert report.duplicated == 0
    assert report.unexpected == 0
    log = a.log_tail(100_000)
    assert '"drained":true' in log


def test_second_signal_exits_at_once(rig: Rig) -> None:
    # The target is unreachable, so the drain of the held message cannot finish.
    dead_target = "mqtt://127.0.0.1:9"
    cfg = bridge_config(
        rig.source.url, dead_target, [{"source": f"{rig.prefix}/#"}], shutdown={"deadline": 25}
    )
    worker = Worker(rig.tmp, cfg)
    rig.workers.append(worker.start(wait_ready=False))
    wait_until(lambda: "source.subscribed" in worker.log_tail(), 15, what="subscription")
    with Publisher(rig.source.url) as pub:
        pub.publish(f"{rig.prefix}/x", 0)
        pub.wait_acked(10)
    wait_until(lambda: worker.metrics()["inflight_messages"] == 1, 10, what="one held message")
    worker.signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(5)
    assert code != 0
    assert time.monotonic() - started < 2
    assert "bridge.forced_exit" in worker.log_tail()
