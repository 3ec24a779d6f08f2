"""Base for long-lived resources: an async context manager whose loops run as named
tasks in one TaskGroup, started on enter and cancelled on exit."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self


class Service:
    def __init__(self) -> None:
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> Self:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        for task in self._tasks:
            task.cancel()
        assert self._tg is not None
        await self._tg.__aexit__(exc_type, exc, tb)
        return None

    async def start(self) -> None:
        """Spawn the service's loops."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._tg is not None, "spawn() before entering the service"
        task = self._tg.create_task(coro, name=name)
        self._tasks.append(task)
        return task


class ConnectPacer:
    """At most one CONNECT per ``interval`` for one client id, with jitter so that many
    workers restarted at once spread their CONNECTs (AWS IoT Core: 1/s per client id)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -math.inf

    async def wait(self) -> None:
        if self.interval:
            wait = self._last + self.interval - time.monotonic()
            await asyncio.sleep(max(0.0, wait) + random.uniform(0, self.interval / 2))
        self._last = time.monotonic()


class Backoff:
    """Capped exponential backoff with full jitter (no thundering herd after an outage)."""

    def __init__(self, initial: float = 0.2, cap: float = 10.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
