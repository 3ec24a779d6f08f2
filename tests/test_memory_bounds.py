"""Memory is bounded by configuration, not by what a peer sends.

A 150 MB PUBLISH through a real Mosquitto: the worker's peak RSS stays far below the
packet, the stream before and after it flows (oracle: lost = 0), and over MQTT 3.1.1 the
refusal is counted (over MQTT 5 the broker itself drops it: we announced a Maximum
Packet Size). A gzip bomb in the archive: replay's peak RSS stays far below what the
object inflates to. Peaks are the kernel's high-water mark of the process's own memory
(VmHWM), not samples. (Not wait4's ru_maxrss: Linux folds the forking parent's RSS into
it at exec, so under a big pytest process it measures pytest.)
"""

from __future__ import annotations

import gzip
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bridge import mqtt_codec as codec
from tests.conftest import S3, Rig
from tests.harness import ROOT, Collector, Mosquitto, Publisher, bridge_config, check, wait_until

MiB = 1024 * 1024
BIG = 150 * MiB


def status_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def publish_streamed(port: int, topic: str, size: int) -> None:
    """One QoS 1 PUBLISH of ``size`` payload bytes, written from a generator (MQTT
    3.1.1, raw socket): the test process never holds the payload."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(codec.encode_connect(
            client_id="big-publisher", protocol=codec.PROTOCOL_311, clean_start=True,
            keepalive=60,
        ))  # fmt: skip
        assert sock.recv(4)[:1] == b"\x20"  # CONNACK
        head = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", 1)
        sock.sendall(b"\x32" + codec.encode_varint(len(head) + size) + head)
        chunk = b"x" * MiB
        for sent in range(0, size, MiB):
            sock.sendall(chunk[: min(MiB, size - sent)])
        assert sock.recv(4) == b"\x40\x02\x00\x01"  # PUBACK: the broker took it


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_150mb_publish_is_refused_without_buffering_it(rig: Rig, protocol: str) -> None:
    """Default limits: the source's Maximum Packet Size is flow.max_inflight_bytes plus
    headroom (64 MiB + 64 KiB), so 150 MB is over it."""
    worker = rig.worker([{"source": f"{rig.prefix}/#"}], source_protocol=protocol)
    assert worker.proc is not None
    topic = f"{rig.prefix}/flow"
    with (
        Collector(rig.target.url, f"{rig.prefix}/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        for n in range(200):
            pub.publish(topic, n, size=1000)
        pub.wait_acked()
        collector.wait_for(200, 30)
        before_rss = status_kib(worker.proc.pid, "VmRSS")
        before_peak = status_kib(worker.proc.pid, "VmHWM")
        publish_streamed(rig.source.port, f"{rig.prefix}/big", BIG)
        for n in range(200, 400):
            pub.publish(topic, n, size=1000)
        pub.wait_acked()
        collector.wait_for(400, 60)
        # Every message finished at the source: the 400, and over 3.1.1 the refused one.
        finished = 401 if protocol == "3.1.1" else 400
        wait_until(
            lambda: worker.metrics()["acknowledged"] >= finished, 60, what="all acknowledged"
        )
        after_peak = status_kib(worker.proc.pid, "VmHWM")
        report = check(pub.acked(), collector.messages)
        m = worker.metrics()
    print(f"worker RSS before {before_rss} KiB, peak before {before_peak} KiB, after {after_peak}")
    assert report.lost == 0, report
    assert report.out_of_order == 0, report
    assert not [msg for msg in collector.messages if msg.topic.endswith("/big")]
    # Far below the packet: what grew is a read buffer or two, not the message.
    assert after_peak - before_peak < 24 * 1024, (before_peak, after_peak)
    assert after_peak * 1024 < BIG // 2
    if protocol == "3.1.1":
        # No way to announce a size in 3.1.1: skipped as it arrived, dead-lettered
        # (without its payload) and acknowledged, so the broker does not send it again.
        assert m[f"dead_lettered{{reason=packet_too_large,route={rig.prefix}/#}}"] == 1
        assert m["acknowledged"] == 401  # the refused one too: the broker will not resend it
    else:
        # Announced in CONNECT: Mosquitto drops it on its side and says so in its log.
        assert m["dead_lettered"] == 0
        assert "Dropping too large outgoing PUBLISH" in rig.source.log.read_text()
    assert m["reconnects{connection=0,side=source}"] == 0


# `python -m bridge …` that writes its own VmHWM (KiB) to $PEAK_FILE as it exits.
_WITH_PEAK = """
import atexit, os, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["PEAK_FILE"], "w").write(line.split()[1])
atexit.register(peak)
sys.argv = ["mqtt-bridge", *sys.argv[1:]]
runpy.run_module("bridge", run_name="__main__")
"""


def _bomb(inflated: int) -> bytes:
    """A gzip bomb: ``inflated`` zero bytes (one endless line) in ~1/1000 of the space.
    Made of identical gzip members, so it costs one compression of 64 MiB."""
    member = gzip.compress(bytes(64 * MiB), 6)
    return member * (inflated // (64 * MiB))


def test_gzip_bomb_keeps_replay_memory_bounded(tmp_path: Path, s3: S3) -> None:
    bomb = _bomb(896 * MiB)
    good = b'{"topic":"a/1","target_topic":"b/1","payload_b64":"eA==","qos":1,"retain":false,'
    good += b'"received_at":1795315200.0,"route":"a/+"}\n'
    keys = {
        "arch/dtb/dt=2026-11-22/hour=10/w-0-1795312800000-000000.jsonl.gz": bomb,
        "arch/dtb/dt=2026-11-22/hour=10/w-0-1795312800001-000001.jsonl.gz": gzip.compress(good),
    }
    for key, body in keys.items():
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)
    cfg = bridge_config("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1", [{"source": "a/+"}])
    cfg["backup"] = {"s3": {"bucket": s3.bucket, "endpoint_url": s3.url, "region": "us-east-1"}}
    config = tmp_path / "replay.yaml"
    config.write_text(yaml.safe_dump(cfg))
    peak_file = tmp_path / "peak"
    with Mosquitto(tmp_path, "target") as target:
        cfg["target"]["url"] = target.url
        config.write_text(yaml.safe_dump(cfg))
        done = subprocess.run(
            [sys.executable, "-c", _WITH_PEAK, "replay", "--config", str(config),
             "--from", f"s3://{s3.bucket}/arch/"],
            capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
            env={**os.environ, "PEAK_FILE": str(peak_file)},
        )  # fmt: skip
    peak = int(peak_file.read_text())
    print(f"bomb: {len(bomb)} bytes inflating to {896 * MiB}; replay peak RSS {peak} KiB")
    assert "Traceback" not in done.stderr
    assert done.returncode == 1, done.stderr  # the bomb is an error; the good object went out
    assert "inflates to more than 268435456 bytes" in done.stdout
    assert "published: 1" in done.stdout
    assert peak * 1024 < 200 * MiB, peak
