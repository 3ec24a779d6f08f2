"""Where messages go that the target can never take. The S3 archive plugs in here later."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import structlog

from bridge.message import Envelope


class DeadLetterSink(Protocol):
    def submit(self, env: Envelope, reason: str, done: Callable[[], None]) -> None:
        """Record ``env`` durably, then call ``done`` (which acknowledges it at the source)."""
        ...


class LogDeadLetters:
    """Logs each dead letter (topic, size, reason; never the payload) and lets it go."""

    def __init__(self) -> None:
        self._log = structlog.get_logger().bind(component="dead_letter")

    def submit(self, env: Envelope, reason: str, done: Callable[[], None]) -> None:
        self._log.warning(
            "message.dead_lettered",
            topic=env.source_topic,
            target_topic=env.topic.decode(errors="replace"),
            bytes=len(env.payload),
            reason=reason,
        )
        done()
