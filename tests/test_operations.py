"""Operations: the metrics catalogue is consistent, readiness follows the target, health works."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.conftest import Rig
from tests.harness import ROOT, Collector, Publisher, Worker, bridge_config, wait_until

CATALOGUE = [
    "received_total", "published_total", "acknowledged_total", "dropped_total",
    "dead_lettered_total", "abandoned_total", "inflight_messages", "inflight_bytes",
    "inflight_messages_limit", "inflight_oldest_age_seconds", "route_inflight_messages",
    "route_last_published_timestamp_seconds", "e2e_latency_seconds", "connected",
    "reconnects_total", "ready", "build_info", "event_loop_lag_seconds",
    "connection_published_total", "connection_window",
    "connection_rate_limit_messages_per_second", "throttled_total", "disconnects_total",
    "skipped_total", "reloads_total", "cohort_percent", "route_released", "route_releases_total",
    "route_rejoins_total", "adoptions_total", "source_sessions_lost_total",
    # path health and failover (issue 12)
    "heartbeat_latency_seconds", "heartbeat_age_seconds", "heartbeat_stale_after_seconds",
    "heartbeats_total", "endpoint_active", "failovers_total", "failback_probes_total",
    "connection_received_total",
    "protocol_errors_total",
]  # fmt: skip


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_metrics_catalogue_counts_add_up(rig: Rig) -> None:
    routes = [
        {"source": f"{rig.prefix}/a/#", "name": "a"},
        {"source": f"{rig.prefix}/b/#", "name": "b", "qos": 0},
    ]
    worker = Worker(rig.tmp, bridge_config(rig.source.url, rig.target.url, routes))
    rig.workers.append(worker.start())
    with (
        Collector(rig.target.url, f"{rig.prefix}/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        pub.publish_numbered([f"{rig.prefix}/a/1", f"{rig.prefix}/a/2"], 600)
        pub.publish_numbered([f"{rig.prefix}/b/1"], 300, qos=1)
        pub.wait_acked()
        collector.wait_for(900, 30)
        time.sleep(0.3)
        m = worker.metrics()
    page = urllib.request.urlopen(f"http://127.0.0.1:{worker.http_port}/metrics", timeout=3)
    types = [
        line.split()[2] for line in page.read().decode().splitlines() if line.startswith("# TYPE")
    ]
    declared = {name.removeprefix("mqtt_bridge_") for name in types}
    assert sorted(set(CATALOGUE) - declared) == [], declared
    assert m["dropped{reason=full,route=a}"] == 0  # zero series exist before any drop
    assert m["skipped{reason=cohort,route=a}"] == 0
    assert m["reloads{result=refused}"] == 0
    # At quiet: everything received was acknowledged; nothing is in flight.
    assert m["received"] == m["acknowledged"] + m["inflight_messages"] + m["abandoned"] == 900
    assert m["inflight_messages"] == 0
    for route, count in (("a", 600), ("b", 300)):
        assert m[f"received{{route={route}}}"] == count
        assert m[f"published{{route={route}}}"] == count
        # Every published message was timed once.
        assert m[f"e2e_latency_seconds_count{{route={route}}}"] == count
        assert m[f"e2e_latency_seconds_bucket{{le=+Inf,route={route}}}"] == count
    assert m["connection_published{connection=0}"] == 900
    assert m["connection_received{connection=0}"] == 900
    # Heartbeats crossed the same connections meanwhile, and none of them was counted above.
    assert m["heartbeats{stage=received}"] >= 1
    assert m["heartbeats{stage=forwarded}"] >= 1
    assert m["ready"] == 1
    assert 0 <= m["event_loop_lag_seconds"] < 1


def test_readyz_follows_the_target_and_health_command(rig: Rig) -> None:
    worker = Worker(
        rig.tmp,
        bridge_config(rig.source.url, rig.target.url, [{"source": f"{rig.prefix}/#"}]),
    )
    rig.workers.append(worker.start())
    port = worker.http_port
    assert status(port, "/readyz") == 200
    assert status(port, "/healthz") == 200
    health = [sys.executable, "-m", "bridge", "health", "--url", f"http://127.0.0.1:{port}/healthz"]
    assert subprocess.run(health, check=False, cwd=ROOT, timeout=30).returncode == 0
    rig.target.stop()
    wait_until(lambda: status(port, "/readyz") == 503, 15, what="/readyz 503")
    assert status(port, "/healthz") == 200  # alive, just not ready
    assert worker.metrics()["connected{connection=0,side=target}"] == 0
    rig.target.start()
    wait_until(lambda: status(port, "/readyz") == 200, 30, what="/readyz 200 again")
    worker.stop()
    down = subprocess.run(health, check=False, cwd=ROOT, timeout=30, capture_output=True, text=True)
    assert down.returncode == 1
    assert "unhealthy" in down.stderr
