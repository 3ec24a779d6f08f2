"""Base for long-lived resources: an async context manager whose loops run as named
tasks in one TaskGroup, started on enter and cancelled on exit."""

from __future__ import annotations

import asyncio
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
