"""Promise 1: at-least-once end to end, through worker crashes (kill -9)."""

from __future__ import annotations

import signal
import time

from tests.conftest import Rig
from tests.harness import Collector, Publisher, Worker, bridge_config, check, wait_until


def test_two_workers_share_group_survive_kill9(rig: Rig) -> None:
    routes = [
        {
            "source": f"{rig.prefix}/+/telemetry",
            "share_group": "svc-a",
            "target": "dt/{1}/telemetry",
        }
    ]
    topics = [f"{rig.prefix}/dev{i}/telemetry" for i in range(4)]

    def make(instance: str) -> Worker:
        cfg = bridge_config(rig.source.url, rig.target.url, routes, instance_id=instance)
        return Worker(rig.tmp, cfg)

    a, b = make("dtb-a"), make("dtb-b")
    rig.workers += [a.start(), b.start()]
    with Collector(rig.target.url, "dt/#") as collector, Publisher(rig.source.url) as pub:
        publishing = pub.publish_in_background(topics, 20_000, qos=1, rate=3000)
        # Act on the publisher's progress, not the collector's: the freeze below must
        # come while messages are still flowing, however slow this machine is today.
        wait_until(lambda: pub.sent >= 6000 and collector.count() >= 1000, 60, what="6000 sent")
        # Freeze the target so that a dies holding a window of unacknowledged messages:
        # exactly the ones an acknowledge-on-receipt bridge would lose.
        assert rig.target.proc is not None
        rig.target.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(
                lambda: a.metrics()["inflight_messages"] >= 100, 30, what="a's window to fill"
            )
            a.signal(signal.SIGKILL)
            a.wait(10)
        finally:
            rig.target.proc.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # the share group keeps assigning to a's session meanwhile
        restarted = Worker(rig.tmp, a.cfg, name="dtb-a-restarted")
        rig.workers.append(restarted.start())
        publishing.join(60)
        pub.wait_acked(120)
        acked = pub.acked()
        assert sum(map(len, acked.values())) == 20_000
        collector.wait_for(20_000, 120)
        time.sleep(1.0)  # let stragglers and duplicates land
        report = check(acked, collector.messages, lambda t: "dt/" + t.split("/")[1] + "/telemetry")
    print(report)
    assert report.lost == 0, report.lost_examples
    assert report.unexpected == 0
    assert report.delivered == 20_000 + report.duplicated
    m_b = b.metrics()
    m_a = restarted.metrics()
    assert m_b["received"] > 0
    assert m_a["received"] > 0
