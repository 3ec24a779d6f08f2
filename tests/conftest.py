from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import Mosquitto, Worker

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
