"""Membership changes lose nothing: graceful restarts, rolling restarts and scale-in.

Every scenario publishes numbered messages while a worker leaves (and maybe comes back)
and counts with the oracle: lost must be 0.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import yaml

from tests.conftest import Rig
from tests.harness import (
    ROOT,
    Collector,
    Publisher,
    Report,
    Worker,
    bridge_config,
    check,
    free_port,
    wait_until,
)

Step = tuple[int, Callable[[], object]]


def stream(rig: Rig, total: int, rate: float, steps: list[Step], wait: float = 60) -> Report:
    """Publish ``total`` numbered messages over 4 topics at ``rate``; run each step once
    that many are sent; then count what reached the target with the oracle."""
    topics = [f"{rig.prefix}/{i}" for i in range(4)]
    with (
        Collector(rig.target.url, f"{rig.prefix}/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        publishing = pub.publish_in_background(topics, total, rate=rate)
        for sent, step in steps:
            wait_until(lambda: pub.sent >= sent, 30, what=f"{sent} sent")  # noqa: B023
            step()
        publishing.join(60)
        pub.wait_acked(60)
        collector.wait_for(total, wait)
        time.sleep(0.5)
        report = check(pub.acked(), collector.messages)
    print(report)
    return report


def restart(worker: Worker, rig: Rig, pause: float) -> Worker:
    """SIGTERM, wait for a clean exit, stay away ``pause`` seconds, start the same id."""
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log_tail()
    time.sleep(pause)
    again = Worker(rig.tmp, worker.cfg, name=f"{worker.name}-again")
    rig.workers.append(again)
    return again.start()


@pytest.mark.parametrize(
    ("protocol", "share_group", "session"),
    [
        ("5", None, "auto"),
        ("3.1.1", None, "auto"),
        # A group only this worker consumes: `auto` would give it up (nobody else takes
        # the traffic, the broker drops it); `keep` is the documented setting for it.
        ("5", "solo", "keep"),
    ],
)
def test_graceful_restart_loses_nothing_published_while_away(
    rig: Rig, protocol: str, share_group: str | None, session: str
) -> None:
    route = {"source": f"{rig.prefix}/+", "target": "{topic}"}
    if share_group:
        route["share_group"] = share_group
    worker = rig.worker(
        [route], instance_id="w", source_protocol=protocol, shutdown={"session": session}
    )
    back: list[Worker] = []
    report = stream(rig, 3000, 400, [(800, lambda: back.append(restart(worker, rig, 2.0)))])
    assert report.lost == 0, report.lost_examples
    assert report.unexpected == 0
    log = worker.log_tail(100_000)
    assert "kept the session" in log
    assert back[0].metrics()["received"] > 0


def test_rolling_restart_of_a_share_group_loses_nothing(rig: Rig) -> None:
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    a = rig.worker(routes, instance_id="a")
    b = rig.worker(routes, instance_id="b")
    report = stream(
        rig, 4000, 400, [(600, lambda: restart(a, rig, 1.0)), (2000, lambda: restart(b, rig, 1.0))]
    )
    assert report.lost == 0, report.lost_examples
    assert report.unexpected == 0
    assert "shared subscriptions only" in a.log_tail(100_000)


def test_scale_in_mid_stream_the_other_member_takes_everything(rig: Rig) -> None:
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    a = rig.worker(routes, instance_id="a")
    b = rig.worker(routes, instance_id="b")

    def scale_in() -> None:  # a never comes back
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0

    report = stream(rig, 4000, 500, [(1000, scale_in)])
    assert report.lost == 0, report.lost_examples
    assert b.metrics()["received"] > 2000  # it took a's share after the leave
    assert "ended the session" in a.log_tail(100_000)


FAST_MEMBERSHIP = {"grace": 3, "refresh": 1}


def _adopted_at(worker: Worker) -> float | None:
    for line in worker.log_tail(1_000_000).splitlines():
        if '"membership.adopted"' in line:
            stamp = json.loads(line)["timestamp"]
            return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return None


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_killed_worker_that_never_returns_is_adopted(rig: Rig, protocol: str) -> None:
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    settings = {"source_protocol": protocol, "membership": FAST_MEMBERSHIP}
    a = rig.worker(routes, instance_id="a", **settings)
    b = rig.worker(routes, instance_id="b", **settings)
    killed: list[float] = []

    def kill() -> None:  # a lost task: it never comes back
        a.signal(signal.SIGKILL)
        killed.append(time.time())

    report = stream(rig, 4000, 400, [(1000, kill)])
    adopted = _adopted_at(b)
    print(f"adopted {adopted - killed[0]:.1f} s after the kill" if adopted else "not adopted")
    assert report.lost == 0, report.lost_examples
    assert adopted is not None, b.log_tail()
    assert b.metrics()["received"] > 2000


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


def test_sessions_lists_a_gone_worker_and_adopt_drains_it_by_hand(rig: Rig) -> None:
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    a = rig.worker(routes, instance_id="a", membership={"grace": 2, "refresh": 1})
    topics = [f"{rig.prefix}/{i}" for i in range(2)]
    with (
        Collector(rig.target.url, f"{rig.prefix}/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        pub.publish_numbered(topics, 200)
        pub.wait_acked()
        collector.wait_for(200, 30)
        a.signal(signal.SIGKILL)  # alone in its group: nobody adopts automatically
        pub.publish_numbered(topics, 400)  # 0..199 again (duplicates) and 200 new per topic
        pub.wait_acked()
        wait_until(
            lambda: (
                "gone" in (listing := _cli("sessions", "--config", str(a.config_path))).stdout
                and listing.returncode == 1
            ),
            20,
            what="a's record gone",
        )
        adopter = {**a.cfg, "instance_id": "operator"}
        path = rig.tmp / "operator.yaml"
        path.write_text(yaml.safe_dump(adopter))
        adopt = _cli("adopt", "--config", str(path), "--client-id", "a-src")
        assert adopt.returncode == 0, adopt.stderr
        assert "adopted a-src" in adopt.stdout
        collector.wait_for(600, 30)
        report = check(pub.acked(), collector.messages)
    print(report)
    assert report.lost == 0, report.lost_examples
    after = _cli("sessions", "--config", str(a.config_path))
    assert after.returncode == 0, after.stdout
    assert "a-src" not in after.stdout


def test_sessions_says_in_one_line_when_the_broker_is_unreachable(rig: Rig) -> None:
    cfg = {**bridge_config(f"mqtt://127.0.0.1:{free_port()}", rig.target.url, [{"source": "x/#"}])}
    cfg["source"]["connect_timeout"] = 1
    path = rig.tmp / "down.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _cli("sessions", "--config", str(path))
    assert result.returncode == 3
    assert result.stderr.startswith("error: cannot reach the source broker")
    assert len(result.stderr.strip().splitlines()) == 1


def test_target_down_releases_the_share_to_the_legacy_member(rig: Rig) -> None:
    group = f"$share/g/{rig.prefix}/+"
    routes = [
        {
            "source": f"{rig.prefix}/+",
            "share_group": "g",
            "target": "{topic}",
            "release_when_target_down": 1.5,
        }
    ]
    worker = rig.worker(routes, instance_id="w", flow={"max_inflight": 200})
    topics = [f"{rig.prefix}/{i}" for i in range(4)]
    with (
        Collector(rig.source.url, group) as legacy,  # the service the DTB replaces
        Collector(rig.target.url, f"{rig.prefix}/#") as migrated,
        Publisher(rig.source.url) as pub,
    ):
        rig.target.stop()
        publishing = pub.publish_in_background(topics, 4000, rate=400)
        wait_until(lambda: worker.metrics()["route_released"] == 1, 30, what="the release")
        publishing.join(60)
        pub.wait_acked(60)
        taken_by_legacy = legacy.count()
        rig.target.start()  # same port
        wait_until(lambda: worker.metrics()["route_rejoins"] == 1, 30, what="the rejoin")
        wait_until(
            lambda: legacy.count() + migrated.count() >= 4000, 60, what="every message somewhere"
        )
        time.sleep(0.5)
        report = check(pub.acked(), [*legacy.messages, *migrated.messages])
    print(report, f"legacy took {taken_by_legacy}")
    assert report.lost == 0, report.lost_examples
    assert report.unexpected == 0
    # Without the release the worker takes half while its target is down (2,000 here).
    assert taken_by_legacy > 3000
    assert worker.metrics()["route_releases"] == 1


def test_a_reconnect_that_finds_no_session_is_a_warning_and_a_counter(rig: Rig) -> None:
    worker = rig.worker([{"source": f"{rig.prefix}/#"}], instance_id="w")
    rig.source.stop()
    for db in rig.source.workdir.glob("*.db"):
        db.unlink()  # the broker comes back without our session (and its backlog)
    rig.source.start()
    wait_until(lambda: worker.metrics()["source_sessions_lost"] == 1, 30, what="the counter")
    assert '"source.session_lost"' in worker.log_tail(100_000)


def test_share_subscription_is_renewed_after_a_broker_restart(rig: Rig) -> None:
    # Mosquitto 2.0.11 restores a persistent session but not its $share subscription.
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    worker = rig.worker(routes, instance_id="w")
    rig.source.stop()
    rig.source.start()
    wait_until(worker.ready, 30, what="ready again")
    with (
        Collector(rig.target.url, f"{rig.prefix}/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        pub.publish_numbered([f"{rig.prefix}/a"], 5)
        pub.wait_acked()
        collector.wait_for(5, 30)
        report = check(pub.acked(), collector.messages)
    assert report.lost == 0, report


def test_two_workers_with_one_instance_id_the_younger_stops_with_one_line(rig: Rig) -> None:
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    fast = {"membership": FAST_MEMBERSHIP}
    first = rig.worker(routes, instance_id="twin", name="twin-1", **fast)
    second = rig.worker(routes, instance_id="twin", name="twin-2", start=False, **fast)
    second.start(wait_ready=False)
    code = second.wait(30)
    log = second.log_tail(100_000)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 2, log
    assert errors == [
        "error: another live worker uses client id 'twin-src' "
        + errors[0].split("'twin-src' ", 1)[1]
    ]
    assert "two workers share instance_id 'twin'" in errors[0]
    assert "Traceback" not in log
    wait_until(first.ready, 30, what="the first worker still serving")


def test_mqtt311_adoption_racing_a_restart_stays_lossless(rig: Rig) -> None:
    # MQTT 3.1.1 has no Will delay: the kill makes the record "gone" at once, so the
    # other worker adopts while the killed one is restarting. Whoever connects last
    # takes the session over; what the other had not acknowledged is redelivered.
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    settings = {"source_protocol": "3.1.1", "membership": FAST_MEMBERSHIP}
    a = rig.worker(routes, instance_id="a", **settings)
    rig.worker(routes, instance_id="b", **settings)

    def kill_and_restart() -> None:
        a.signal(signal.SIGKILL)
        a.wait(10)
        again = Worker(rig.tmp, a.cfg, name="a-again")
        rig.workers.append(again.start())

    report = stream(rig, 4000, 400, [(1000, kill_and_restart)])
    assert report.lost == 0, report.lost_examples


def test_scale_in_during_a_target_outage_is_adopted(rig: Rig) -> None:
    # A CPU-based HPA scales in while the target is down (the workers idle with a full
    # flow). The leaving worker cannot drain: it keeps its session, marks it gone, and the
    # other worker adopts it and delivers it once the target is back.
    routes = [{"source": f"{rig.prefix}/+", "share_group": "g", "target": "{topic}"}]
    settings = {"membership": FAST_MEMBERSHIP, "shutdown": {"deadline": 3}}
    a = rig.worker(routes, instance_id="a", **settings)
    b = rig.worker(routes, instance_id="b", **settings)

    def scale_in_while_down() -> None:  # a never comes back
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0
        assert "not drained within shutdown.deadline" in a.log_tail(100_000)
        rig.target.start()

    report = stream(rig, 3000, 400, [(0, rig.target.stop), (800, scale_in_while_down)], 90)
    assert report.lost == 0, report.lost_examples
    assert _adopted_at(b) is not None, b.log_tail()
