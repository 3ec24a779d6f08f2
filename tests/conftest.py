from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.harness import Mosquitto, Worker, bridge_config

_counter = itertools.count()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """Unique topics per test: brokers are per test too, but logs read better."""
    return f"t{next(_counter)}-{request.node.name[:30].replace('[', '-').rstrip(']')}"


@pytest.fixture
def source_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path, "source") as broker:
        yield broker


@pytest.fixture
def target_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path, "target") as broker:
        yield broker


@dataclass
class S3:
    server: Any
    url: str
    port: int
    client: Any
    bucket: str

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        # A new server on the same port; moto keeps the buckets in this process.
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A real S3 API over HTTP: moto in server mode, on a free loopback port."""
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)  # also inherited by the worker processes
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    bucket = f"archive-{next(_counter)}"
    client.create_bucket(Bucket=bucket)
    handle = S3(server, url, port, client, bucket)
    yield handle
    handle.stop()


@pytest.fixture
def workers(request: pytest.FixtureRequest) -> Iterator[list[Worker]]:
    """Started workers register here; they are stopped (and their logs shown on failure) after."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for worker in started:
            print(f"---- log of {worker.name} ----\n{worker.log_tail()}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@dataclass
class Rig:
    """What an end-to-end test works with: two brokers, its workers, its own topics."""

    tmp: Path
    source: Mosquitto
    target: Mosquitto
    workers: list[Worker]
    prefix: str

    def worker(
        self,
        routes: list[dict[str, Any]],
        *,
        name: str | None = None,
        target_url: str | None = None,
        start: bool = True,
        **settings: Any,
    ) -> Worker:
        """Configure (and by default start) a worker; it is stopped after the test."""
        cfg = bridge_config(self.source.url, target_url or self.target.url, routes, **settings)
        worker = Worker(self.tmp, cfg, name=name)
        self.workers.append(worker)
        return worker.start() if start else worker


@pytest.fixture
def rig(
    tmp_path: Path,
    source_broker: Mosquitto,
    target_broker: Mosquitto,
    workers: list[Worker],
    topic_prefix: str,
) -> Rig:
    return Rig(tmp_path, source_broker, target_broker, workers, topic_prefix)
