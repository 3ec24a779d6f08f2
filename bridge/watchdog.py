"""Is the event loop alive? A heartbeat on the loop and a thread that watches it.

/healthz turns 503 once the heartbeat is older than ``stall_after`` (a loop that is
slow but not dead still answers, and says so). A loop blocked outright cannot answer
at all; the watching thread then logs where it is stuck, once per stall, so the
restart that the liveness probe causes leaves a trace.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback

import structlog

from bridge.service import Service


class Watchdog(Service):
    def __init__(self, interval: float = 0.5, stall_after: float = 5.0) -> None:
        super().__init__()
        self.interval = interval
        self.stall_after = stall_after
        self.lag = 0.0  # how late the last heartbeat woke up, in seconds
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._loop_thread = threading.get_ident()

    async def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self.spawn(self._beat(), name="watchdog")
        threading.Thread(target=self._watch, name="loop-watchdog", daemon=True).start()

    async def __aexit__(self, *exc_info: object) -> bool | None:
        self._stop.set()
        return await super().__aexit__(*exc_info)  # type: ignore[arg-type]

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self._last_beat < self.stall_after

    async def _beat(self) -> None:
        while True:
            expected = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.lag = max(0.0, now - expected)
            self._last_beat = now

    def _watch(self) -> None:
        reported = False
        log = structlog.get_logger()
        while not self._stop.wait(self.interval):
            stalled = time.monotonic() - self._last_beat
            if stalled >= self.stall_after and not reported:
                reported = True
                frame = sys._current_frames().get(self._loop_thread)
                where = "".join(traceback.format_stack(frame, limit=8)) if frame else "unknown"
                log.error("loop.stalled", seconds=round(stalled, 1), stack=where)
            elif stalled < self.stall_after:
                reported = False
