"""Promise 4: SIGTERM drains what is in flight, acknowledges it and exits 0 in time."""

from __future__ import annotations

import signal
import time

from tests.conftest import Rig
from tests.harness import Collector, Publisher, Worker, bridge_config, check, free_port, wait_until


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


def test_leave_while_the_source_reconnects_never_drops_the_session_with_messages(
    rig: Rig,
) -> None:
    # The leave is kept busy by an unreachable S3 (best effort: the flush waits until the
    # deadline). Meanwhile the source broker comes back with 20 messages queued for our
    # session. Leaving must not resubscribe and take them, nor end the session with
    # expiry 0: they must wait for the next start of this instance_id.
    dead_s3 = f"http://127.0.0.1:{free_port()}"
    backup = {"s3": {"bucket": "b-1", "endpoint_url": dead_s3, "region": "us-east-1"}}
    routes = [{"source": f"{rig.prefix}/#"}]
    worker = rig.worker(routes, instance_id="leaver", backup=backup, shutdown={"deadline": 6})
    with Publisher(rig.source.url) as pub:
        pub.publish(f"{rig.prefix}/first", 0)  # something for the archive to flush
        pub.wait_acked()
    wait_until(lambda: worker.metrics()["acknowledged"] == 1, 10, what="the first message")
    rig.target.stop()
    rig.source.stop()
    worker.signal(signal.SIGTERM)
    time.sleep(0.5)
    rig.source.start()  # same port, sessions restored from persistence
    with Publisher(rig.source.url) as pub:
        pub.publish_numbered([f"{rig.prefix}/late"], 20)
        pub.wait_acked()
        acked = pub.acked()
    assert worker.wait(15) == 0
    rig.target.start()
    with Collector(rig.target.url, f"{rig.prefix}/#") as collector:
        rig.worker(routes, instance_id="leaver", name="leaver-again")
        collector.wait_for(20, 30)
        report = check(acked, collector.messages)
    assert report.lost == 0, report
