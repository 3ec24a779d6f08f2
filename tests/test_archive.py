"""The S3 archive (a real S3 API over HTTP: moto in server mode) and replay."""

from __future__ import annotations

import base64
import gzip
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import S3, Rig
from tests.harness import (
    ROOT,
    Collector,
    Mosquitto,
    Publisher,
    check,
    wait_until,
)

KEY = re.compile(r"^arch/dtb/dt=\d{4}-\d{2}-\d{2}/hour=\d{2}/w-0-\d{13}-\d{6}\.jsonl\.gz$")


def archived(s3: S3, prefix: str = "arch/") -> list[dict[str, Any]]:
    records = []
    paginator = s3.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=s3.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = s3.client.get_object(Bucket=s3.bucket, Key=item["Key"])["Body"].read()
            for line in gzip.decompress(body).splitlines():
                records.append({**json.loads(line), "_key": item["Key"]})
    return records


def backup(s3: S3, **extra: Any) -> dict[str, Any]:
    return {"s3": {"bucket": s3.bucket, "prefix": "arch", "endpoint_url": s3.url,
                   "region": "us-east-1", "flush_interval": 0.5, **extra}}  # fmt: skip


def test_archive_holds_exactly_the_delivered_set(rig: Rig, s3: S3) -> None:
    routes = [{"source": f"{rig.prefix}/+", "target": "out/{1}", "name": "telemetry"}]
    worker = rig.worker(routes, backup=backup(s3, mode="required"))
    topics = [f"{rig.prefix}/{i}" for i in range(4)]
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v")]
    props.ContentType = "text/plain"
    props.CorrelationData = b"\x00\xffc"
    with Collector(rig.target.url, "out/#") as collector, Publisher(rig.source.url) as pub:
        pub.publish(f"{rig.prefix}/props", 0, properties=props)
        pub.publish_numbered(topics, 10_000, size=100)
        pub.wait_acked()
        collector.wait_for(10_001, 60)
        report = check(pub.acked(), collector.messages, lambda t: "out/" + t.rsplit("/", 1)[1])
        acked = pub.acked()
    assert report.lost == 0, report
    # Heartbeats crossed the bridge meanwhile; the exact count below proves none was archived.
    assert worker.metrics()["heartbeats{stage=forwarded}"] >= 1
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    records = archived(s3)
    assert len(records) == 10_001 + report.duplicated
    assert {
        (r["topic"], int(base64.b64decode(r["payload_b64"]).split(b"|")[1])) for r in records
    } == {(topic, n) for topic, ns in acked.items() for n in ns}
    for r in records:
        assert KEY.match(r["_key"]), r["_key"]
        assert set(r) - {"_key"} == {
            "topic", "target_topic", "payload_b64", "qos", "retain", "properties", "received_at",
            "direction", "instance", "route",
        }  # fmt: skip
        payload = base64.b64decode(r["payload_b64"])
        assert payload.startswith(f"{r['topic']}|".encode())
        assert r["target_topic"] == "out/" + r["topic"].rsplit("/", 1)[1]
        assert (r["direction"], r["instance"], r["route"], r["qos"]) == (
            "dtb",
            "w-0",
            "telemetry",
            1,
        )
    with_props = next(r for r in records if r["topic"].endswith("/props"))
    assert with_props["properties"] == {
        "user_properties": [["k", "v"]], "content_type": "text/plain",
        "correlation_data_b64": base64.b64encode(b"\x00\xffc").decode(),
    }  # fmt: skip
    assert '"drained":true' in worker.log_tail(100_000)


def test_required_mode_acknowledges_nothing_while_s3_is_down(rig: Rig, s3: S3) -> None:
    routes = [{"source": f"{rig.prefix}/#"}]
    worker = rig.worker(routes, flow={"max_inflight": 300}, backup=backup(s3, mode="required"))
    with (
        Collector(rig.target.url, f"{rig.prefix}/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        publishing = pub.publish_in_background(
            [f"{rig.prefix}/a", f"{rig.prefix}/b"], 4000, rate=800
        )
        wait_until(
            lambda: pub.sent >= 1000 and worker.metrics()["archive_batches"] >= 1,
            30,
            what="first batches",
        )
        s3.stop()
        time.sleep(1.5)  # an upload already under way may still land
        before = worker.metrics()
        time.sleep(3.0)
        during = worker.metrics()
        s3.start()
        publishing.join(60)
        pub.wait_acked()
        acked = pub.acked()
        collector.wait_for(4000, 60)
        wait_until(lambda: worker.metrics()["acknowledged"] >= 4000, 60, what="all acknowledged")
        report = check(acked, collector.messages)
    assert during["acknowledged"] == before["acknowledged"]  # nothing acknowledged at the source
    assert during["inflight_messages"] == 300  # the backlog waits in the source broker
    assert during["archive_failures"] >= 1
    assert report.lost == 0, report
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    topics_numbers = {
        (r["topic"], base64.b64decode(r["payload_b64"]).split(b"|")[1]) for r in archived(s3)
    }
    assert len(topics_numbers) == 4000


def test_best_effort_keeps_delivering_while_s3_is_down(rig: Rig, s3: S3) -> None:
    routes = [{"source": f"{rig.prefix}/#"}]
    worker = rig.worker(routes, backup=backup(s3, mode="best_effort", max_buffer_bytes=64 * 1024))
    with (
        Collector(rig.target.url, f"{rig.prefix}/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        s3.stop()
        pub.publish_numbered([f"{rig.prefix}/a"], 3000, size=200)
        pub.wait_acked()
        collector.wait_for(3000, 60)
        # The first upload is tried once the batch is a flush_interval old.
        wait_until(lambda: worker.metrics()["archive_failures"] >= 1, 30, what="a failed upload")
        m = worker.metrics()
        report = check(pub.acked(), collector.messages)
        s3.start()
    assert report.lost == 0, report
    assert m["acknowledged"] == 3000  # the flow never waited for S3
    assert m["archive_dropped"] > 0
    assert m["archive_failures"] >= 1
    assert m["archive_buffered_bytes"] <= 64 * 1024


def _replay(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "replay", "--config", str(cfg_path), *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


def test_replay_redrives_the_archive_with_filters_and_skips_corrupt_objects(
    rig: Rig, s3: S3
) -> None:
    routes = [{"source": f"{rig.prefix}/+", "target": "out/{1}"}]
    worker = rig.worker(routes, backup=backup(s3))
    marks = []
    with Publisher(rig.source.url) as pub:
        for phase in range(3):
            marks.append(time.time())
            for n in range(100):
                pub.publish(f"{rig.prefix}/{'ab'[n % 2]}", phase * 100 + n)
            pub.wait_acked()
            time.sleep(1.2)
    marks.append(time.time())
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    corrupt = "arch/dtb/dt=2026-01-01/hour=00/w-0-1767225600000-000000.jsonl.gz"
    s3.client.put_object(Bucket=s3.bucket, Key=corrupt, Body=b"this is not gzip")

    with Mosquitto(rig.tmp, "fresh") as fresh:
        replay_cfg = rig.tmp / "replay.yaml"
        replay_cfg.write_text(
            yaml.safe_dump({**worker.cfg, "target": {"url": fresh.url, "protocol": "5"}})
        )
        source = f"s3://{s3.bucket}/arch/"

        with Collector(fresh.url, "out/#", client_id="all") as everything:
            done = _replay(replay_cfg, "--from", source)
            everything.wait_for(300, 30)
        assert done.returncode == 1, done.stderr  # the corrupt object is an error
        assert "published: 300" in done.stdout
        assert "errors:    1" in done.stdout
        assert corrupt in done.stdout
        numbers = sorted(int(m.payload.split(b"|")[1]) for m in everything.messages)
        assert numbers == list(range(300))
        assert all(("bridge-replay", "w-0") in m.user_properties for m in everything.messages)

        with Collector(fresh.url, "out/#", client_id="window") as window:
            window_args = ["--since", str(marks[1]), "--until", str(marks[2])]
            done = _replay(replay_cfg, "--from", source, *window_args,
                           "--topic-filter", f"{rig.prefix}/a", "--rate", "500")  # fmt: skip
            window.wait_for(50, 30)
            time.sleep(0.5)
        assert "published: 50" in done.stdout, done.stdout
        assert sorted(int(m.payload.split(b"|")[1]) for m in window.messages) == list(
            range(100, 200, 2)
        )

        dry = _replay(replay_cfg, "--from", source, "--dry-run", "--to-source-topic")
        assert "published: 300" in dry.stdout
