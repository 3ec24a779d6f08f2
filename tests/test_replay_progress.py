"""Replay progress where nobody watches a terminal (a Kubernetes Job's log): a line every
--progress-every seconds with count, rate and ETA, and a dry run that says it would
publish."""

from __future__ import annotations

import base64
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from bridge.replay import Summary, progress_line
from tests.conftest import S3
from tests.harness import ROOT, Collector, Mosquitto

LINE = re.compile(
    r"^objects (\d+)/(\d+)  messages (\d+)  (published|would publish) (\d+)  skipped 0  "
    r"errors 0  rate \d+ msg/s  eta (\S+)$"
)


def test_progress_line_counts_rate_and_eta() -> None:
    s = Summary(objects=10, messages=5000, published=4990)
    assert progress_line(s, 40, 20.0) == (
        "objects 10/40  messages 5000  published 4990  skipped 0  errors 0  "
        "rate 250 msg/s  eta 1m00s"
    )
    dry = Summary(objects=0, dry_run=True)
    assert progress_line(dry, 3, 0.0).endswith("rate 0 msg/s  eta ?")
    assert "would publish 0" in progress_line(dry, 3, 0.0)
    assert progress_line(Summary(objects=1, messages=1), 7201, 1.0).endswith("eta 2h00m")


def archived_record(n: int) -> str:
    topic = f"dev/{n % 3}"
    return json.dumps(
        {
            "topic": topic,
            "target_topic": f"out/{n % 3}",
            "payload_b64": base64.b64encode(f"{topic}|{n}|".encode()).decode(),
            "qos": 1,
            "retain": False,
            "properties": {},
            "received_at": 1795424400.0 + n,
            "direction": "dtb",
            "instance": "w-0",
            "route": "r",
        }
    )


def put_objects(s3: S3, objects: int, per_object: int) -> None:
    for i in range(objects):
        lines = [archived_record(n) for n in range(i * per_object, (i + 1) * per_object)]
        body = gzip.compress(("\n".join(lines) + "\n").encode())
        key = f"arch/dtb/dt=2026-11-23/hour=10/w-0-{1795424400000 + i}-{i:06d}.jsonl.gz"
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)


def replay(cfg: Path, s3: S3, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "replay", "--config", str(cfg),
         "--from", f"s3://{s3.bucket}/arch/", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


def config(tmp_path: Path, s3: S3, target_url: str) -> Path:
    path = tmp_path / "replay.yaml"
    path.write_text(
        yaml.safe_dump({
            "instance_id": "w-0", "direction": "dtb",
            "source": {"url": "mqtt://127.0.0.1:1"}, "target": {"url": target_url},
            "routes": [{"source": "dev/+", "target": "out/{1}"}],
            "backup": {"s3": {"bucket": s3.bucket, "endpoint_url": s3.url,
                              "region": "us-east-1"}},
        })
    )  # fmt: skip
    return path


def progress(stderr: str) -> list[re.Match[str]]:
    found = [LINE.match(line) for line in stderr.splitlines()]
    return [m for m in found if m is not None]


def test_a_replay_without_a_terminal_prints_progress_lines(tmp_path: Path, s3: S3) -> None:
    put_objects(s3, 12, 50)
    cfg = config(tmp_path, s3, "mqtt://127.0.0.1:1")

    dry = replay(cfg, s3, "--dry-run", "--progress-every", "0")
    assert dry.returncode == 0, dry.stderr
    lines = progress(dry.stderr)
    assert len(lines) >= 12, dry.stderr  # one per record read with a 0 s interval...
    assert all(m[4] == "would publish" for m in lines)
    objects = [int(m[1]) for m in lines]
    assert objects == sorted(objects)
    assert (int(lines[-1][1]), int(lines[-1][2]), int(lines[-1][5])) == (12, 12, 600)
    assert lines[-1][6] == "0s"  # nothing left
    assert "would be published: 600   (dry run: nothing was sent)" in dry.stdout

    quiet = replay(cfg, s3, "--dry-run")  # the default interval, 10 s: only the last line
    assert quiet.returncode == 0, quiet.stderr
    assert len(progress(quiet.stderr)) == 1

    with Mosquitto(tmp_path, "fresh") as fresh, Collector(fresh.url, "out/#") as got:
        live = replay(config(tmp_path, s3, fresh.url), s3, "--progress-every", "0")
        got.wait_for(600, 30)
    assert live.returncode == 0, live.stderr
    lines = progress(live.stderr)
    assert lines
    assert all(m[4] == "published" for m in lines)
    assert int(lines[-1][5]) == 600
    assert "published: 600" in live.stdout
    assert got.count() >= 600
