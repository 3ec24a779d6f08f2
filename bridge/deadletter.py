"""Where messages go that the target can never take: the S3 archive, or the log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import structlog

from bridge.archive import DEAD_LETTER, S3Archive
from bridge.message import Envelope


class DeadLetterSink(Protocol):
    def submit(self, env: Envelope, reason: str, done: Callable[[], None]) -> None:
        """Record ``env`` durably, then call ``done`` (which acknowledges it at the source)."""
        ...


class ArchiveDeadLetters:
    """Logs each dead letter and writes it under ``dead-letter/`` in the S3 archive; the
    source acknowledgement waits until the object holding it is durable."""

    def __init__(self, archive: S3Archive, record: Callable[[Envelope], dict[str, Any]]) -> None:
        self._archive = archive
        self._record = record
        self._log = LogDeadLetters()

    def submit(self, env: Envelope, reason: str, done: Callable[[], None]) -> None:
        self._log.submit(env, reason, lambda: None)
        record = self._record(env)
        record["reason"] = reason
        self._archive.add(DEAD_LETTER, record, done)


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
