"""Pacing holds on the wire: no 1 s window carries more than the configured rate, even
when the event loop stalls (IoT Core counts what arrives, and discards the excess)."""

from __future__ import annotations

import random
import signal
import threading
import time

from bridge.pacing import Pacer, Pacing, TokenBucket
from tests.conftest import Rig
from tests.fakes import CountingProxy, max_in_window
from tests.harness import Collector, Publisher, Worker, bridge_config, check


def simulate(grant: object, stalls: random.Random, seconds: float = 30.0) -> list[float]:
    """Offer a message every 1 ms of a simulated clock, with 40-80 ms stalls now and
    then; returns the times of the sends that were granted."""
    sent: list[float] = []
    now = 0.0
    while now < seconds:
        if stalls.random() < 0.002:
            now += stalls.uniform(0.04, 0.08)  # the loop was busy: nothing ran
        if grant(now):  # type: ignore[operator]
            sent.append(now)
        now += 0.001
    return sent


def test_the_pacer_never_lets_more_than_the_rate_into_any_second() -> None:
    pacer = Pacer(Pacing(publish_rate=100, burst=0.1), 100, 0.0)
    sent = simulate(lambda now: pacer.delay(200, now) == 0, random.Random(15))
    assert max_in_window(sent) <= 100
    assert len(sent) >= 0.97 * 100 * 30  # and it still uses the rate
    # The bucket alone (what paced before) lets rate x (1 + burst) through some second:
    # the test above would fail without the cap.
    bucket = TokenBucket(100, 0.1, 0.0)
    assert max_in_window(simulate(lambda now: bucket.delay(1, now) == 0, random.Random(15))) > 100


def test_the_cap_counts_write_times_not_grant_times() -> None:
    """Grants are written when the loop iteration's work is done; a stall in between
    delays the write. Told the write time (``written``), the cap holds on the wire."""

    def run(tell: bool) -> list[float]:
        pacer = Pacer(Pacing(publish_rate=100, burst=1.0), 1000, 0.0)
        rng = random.Random(3)
        wire: list[float] = []
        now = 0.0
        while now < 20.0:
            granted = 0
            while pacer.delay(200, now) == 0:  # an iteration takes all it may
                granted += 1
            if granted and rng.random() < 0.2:
                now += rng.uniform(0.04, 0.08)  # the rest of the iteration stalls
            wire.extend([now] * granted)  # then the connection writes them
            if tell:
                pacer.written(now)
            now += 0.005
        return wire

    assert max_in_window(run(tell=True)) <= 100
    assert max_in_window(run(tell=False)) > 100  # what counting grants let through


def test_paced_connections_stay_under_the_rate_on_the_wire_through_stalls(rig: Rig) -> None:
    rate = 100
    with CountingProxy(rig.target.port, rig.tmp) as proxy:
        cfg = bridge_config(
            rig.source.url,
            proxy.url,
            [{"source": f"{rig.prefix}/#", "target": "out/{1}"}],
            target={"connections": 2, "limits": {"publish_rate": rate, "burst": 0.1}},
            # The proxy counts every PUBLISH: the bridge's own heartbeat would be one more.
            heartbeat={"enabled": False},
        )
        worker = Worker(rig.tmp, cfg)
        rig.workers.append(worker.start())
        assert worker.proc is not None
        stop = threading.Event()

        def stall() -> None:
            # Freeze the whole worker for 40-80 ms now and then: granted-but-unwritten
            # messages must not bunch up after it.
            rng = random.Random(15)
            while not stop.wait(rng.uniform(0.2, 0.5)):
                worker.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
                time.sleep(rng.uniform(0.04, 0.08))
                worker.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

        staller = threading.Thread(target=stall, daemon=True)
        topics = [f"{rig.prefix}/dev{i}" for i in range(8)]
        with (
            Collector(rig.target.url, "out/#") as collector,
            Publisher(rig.source.url) as pub,
        ):
            staller.start()
            try:
                pub.publish_numbered(topics, 1600)
                pub.wait_acked(60)
            finally:
                stop.set()
                staller.join()
            collector.wait_for(1600, 60)
            report = check(pub.acked(), collector.messages, lambda t: "out/" + t.split("/", 1)[1])
    assert report.lost == 0, report
    assert report.out_of_order == 0, report
    per_client = {cid: times for cid, times in proxy.publishes.items() if times}
    assert sum(map(len, per_client.values())) == 1600 + report.duplicated
    for cid, times in per_client.items():
        peak = max_in_window(times)
        print(cid, peak)
        # Measured where the proxy reads: its own scheduling can move a message by a few
        # ms, which the cap's 1 % margin absorbs; before the cap this was 110 to 119.
        assert peak <= rate, (cid, peak)
