"""`mqtt-bridge sync-retained` against real Mosquitto: the source's retained state reaches
the target with retain set, through the route's cohort and the target's limits; a delete
is carried as one; failures exit non-zero; a running worker is not disturbed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import S3, Rig
from tests.harness import ROOT, Collector, Publisher, bridge_config, free_port, wait_until
from tests.test_archive import archived


def sync_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bridge", "sync-retained", "--config", str(config), *args]


def run_sync(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sync_command(config, *args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def summary(stdout: str) -> dict[str, int]:
    """The summary's counts: 'published:     46   (…)' -> {'published': 46}."""
    out = {}
    for line in stdout.splitlines():
        key, sep, rest = line.partition(":")
        if sep and rest.split() and rest.split()[0].isdigit():
            out[key.strip()] = int(rest.split()[0])
    return out


def write_config(tmp_path: Path, cfg: dict[str, Any], name: str = "sync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sync_retained_carries_retained_state_and_a_delete(rig: Rig, tmp_path: Path) -> None:
    p = rig.prefix
    devices = [f"dev{i:02d}" for i in range(60)]
    canary = tmp_path / "canary.txt"
    canary.write_text("\n".join(devices[:40]) + "\n")  # the cohort: 40 of 60 devices
    routes = [
        {
            "source": f"{p}/+/status",
            "name": "status",
            "mode": "copy",
            "target": f"{p}-dt/{{1}}/status",
            "device": "{1}",
            "cohort": {"percent": 0, "include_file": str(canary)},
        },
        # A takeover route consumes through $share, which never gets retained messages:
        # exactly what the sync is for.
        {
            "source": f"{p}/+/config",
            "name": "config",
            "share_group": "svc-a",
            "target": f"{p}-dt/{{1}}/config",
        },
    ]
    # Paced slowly, so that the sync is still busy when the delete is published.
    limits = {"publish_rate": 20, "burst": 0.1}
    config = write_config(
        tmp_path, bridge_config(rig.source.url, rig.target.url, routes, target={"limits": limits})
    )
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.UserProperty = [("fw", "1.2")]
    with Publisher(rig.source.url) as pub:
        for d in devices:
            pub.publish(f"{p}/{d}/status", 0, retain=True, properties=props)
        for d in devices[:5]:
            pub.publish(f"{p}/{d}/config", 0, retain=True)
        pub.publish(f"{p}/dev59/status", 1)  # not retained: not state
        pub.wait_acked()

    dry = run_sync(config, "--dry-run", "--quiet", "1")
    assert dry.returncode == 0, dry.stderr
    counts = summary(dry.stdout)
    assert (counts["topics"], counts["published"], counts["skipped"]) == (65, 45, 20)
    assert "would publish (dry run)" in dry.stdout
    with Collector(rig.target.url, f"{p}-dt/#") as nothing:
        time.sleep(1)
        assert nothing.count() == 0  # a dry run publishes nothing

    with Collector(rig.target.url, f"{p}-dt/#") as live:
        proc = subprocess.Popen(
            sync_command(config, "--quiet", "1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        wait_until(lambda: live.count() >= 1, 30, what="the first synced message")
        with Publisher(rig.source.url) as pub:
            # A delete on the source while the sync runs (dev00 is in the cohort).
            pub.client.publish(f"{p}/dev00/status", b"", qos=1, retain=True).wait_for_publish(10)
        out, err = proc.communicate(timeout=120)
    print(out)
    assert proc.returncode == 0, err
    counts = summary(out)
    assert counts == {
        "topics": 66,
        "bytes": sum(len(f"{p}/{d}/status|0|") for d in devices)
        + sum(len(f"{p}/{d}/config|0|") for d in devices[:5]),
        "published": 46,
        "skipped": 20,
        "dead-lettered": 0,
        "live": 0,
    }, out
    assert "1 deletes" in out

    # A new subscriber on the target gets the source's retained state, delete included.
    with Collector(rig.target.url, f"{p}-dt/#") as fresh:
        fresh.wait_for(44, 15, stall=2)
        time.sleep(0.5)
        got = {msg.topic: msg for msg in fresh.messages}
    assert set(got) == {f"{p}-dt/{d}/status" for d in devices[1:40]} | {
        f"{p}-dt/{d}/config" for d in devices[:5]
    }
    assert len(fresh.messages) == 44
    for d in devices[1:40]:
        msg = got[f"{p}-dt/{d}/status"]
        assert msg.retain
        assert msg.payload == f"{p}/{d}/status|0|".encode()
        assert msg.properties["ContentType"] == "application/json"
        assert msg.user_properties == [("fw", "1.2"), ("mqtt-bridge-hop", "w-0")]
    assert got[f"{p}-dt/dev01/config"].payload == f"{p}/dev01/config|0|".encode()


def test_sync_retained_fails_loudly_and_leaves_a_running_worker_alone(
    rig: Rig, tmp_path: Path
) -> None:
    p = rig.prefix
    routes = [
        {
            "source": f"{p}/+/config",
            "name": "config",
            "share_group": "svc-a",
            "target": f"{p}-dt/{{1}}/config",
        }
    ]
    with Publisher(rig.source.url) as pub:
        for i in range(5):
            pub.publish(f"{p}/d{i}/config", 0, retain=True)
        pub.publish(f"{p}/big/config", 0, retain=True, size=200)  # over max_payload
        pub.wait_acked()
    worker = rig.worker(routes, target={"limits": {"max_payload": 100}})

    done = run_sync(worker.config_path, "--quiet", "1")
    assert done.returncode == 1  # a dead letter is a failure to carry the state
    counts = summary(done.stdout)
    assert (counts["topics"], counts["published"], counts["dead-lettered"]) == (6, 5, 1)
    assert "payload_too_large: 200 bytes > 100" in done.stderr
    # The worker was not disturbed: its client ids are not the sync's. (Whether its $share
    # subscription got the retained messages depends on the broker: MQTT 5, 4.8.2 says
    # no, Mosquitto 2.0.11 sends them anyway.)
    m = worker.metrics()
    assert m["reconnects"] == 0
    assert worker.ready()

    wrong = run_sync(worker.config_path, "--route", "nope")
    assert wrong.returncode == 2
    assert wrong.stderr == (
        "error: sync-retained: --route 'nope' matches no route (routes: config)\n"
    )
    nowhere = bridge_config(f"mqtt://127.0.0.1:{free_port()}", rig.target.url, routes)
    unreachable = run_sync(write_config(tmp_path, nowhere), "--timeout", "3")
    assert unreachable.returncode == 1
    assert (
        "error: not done within --timeout 3 s: the source subscription did not succeed"
        in unreachable.stdout
    )


def test_sync_retained_archives_like_the_live_flow(rig: Rig, s3: S3, tmp_path: Path) -> None:
    p = rig.prefix
    routes = [{"source": f"{p}/+/status", "name": "status", "target": f"{p}-dt/{{1}}/status"}]
    backup = {"s3": {"bucket": s3.bucket, "prefix": "arch", "endpoint_url": s3.url,
                     "region": "us-east-1", "flush_interval": 0.5, "mode": "required"}}  # fmt: skip
    cfg = bridge_config(
        rig.source.url,
        rig.target.url,
        routes,
        backup=backup,
        target={"limits": {"max_payload": 100}},
    )
    with Publisher(rig.source.url) as pub:
        for i in range(10):
            pub.publish(f"{p}/d{i}/status", 0, retain=True)
        pub.publish(f"{p}/big/status", 0, retain=True, size=200)
        pub.wait_acked()
    done = run_sync(write_config(tmp_path, cfg), "--quiet", "1")
    assert done.returncode == 1  # the dead letter
    counts = summary(done.stdout)
    assert (counts["topics"], counts["published"], counts["dead-lettered"]) == (11, 10, 1)
    records = archived(s3)
    kept = [r for r in records if "/dead-letter/" not in "/" + r["_key"]]
    dead = [r for r in records if r["_key"].startswith("arch/dead-letter/")]
    # As in the live flow: what goes to the target is archived, what breaks the target's
    # limits is a dead letter; both under the sync's own name.
    assert sorted(r["topic"] for r in kept) == sorted(f"{p}/d{i}/status" for i in range(10))
    assert [r["topic"] for r in dead] == [f"{p}/big/status"]
    assert dead[0]["reason"] == "payload_too_large: 200 bytes > 100"
    for r in records:
        assert "/w-0-sync-" in r["_key"], r["_key"]
        assert r["instance"] == "w-0-sync"
        assert r["retain"] is True
