"""The S3 archive: every bridged message, as gzip-compressed JSON Lines, Hive-style keys.

Record (one line per message; ``record()`` writes it, replay, Athena and the tests read it):
    topic, target_topic, payload_b64, qos, retain, properties, received_at,
    direction, instance, route            (+ reason, for dead letters)
Key:
    {prefix}{direction}/dt=YYYY-MM-DD/hour=HH/{instance}-{first_received_ms}-{seq}.jsonl.gz
    {prefix}dead-letter/{direction}/dt=…/hour=…/{instance}-{first_received_ms}-{seq}.jsonl.gz

A message is archived when it is taken (in parallel with its delivery). In ``required``
mode its source acknowledgement also waits for the object holding it; dead letters
always do, in both modes, because a dead letter is only as good as its record.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import gzip
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from bridge import mqtt_codec as codec
from bridge.link import Backoff
from bridge.message import Envelope
from bridge.service import Service

ARCHIVE = "archive"
DEAD_LETTER = "dead-letter"

_PROPERTY_NAMES = {
    codec.PAYLOAD_FORMAT: "payload_format_indicator",
    codec.MESSAGE_EXPIRY: "message_expiry_interval",
    codec.CONTENT_TYPE: "content_type",
    codec.RESPONSE_TOPIC: "response_topic",
}


def properties_to_json(props: codec.Properties | None) -> dict[str, Any]:
    if not props:
        return {}
    out: dict[str, Any] = {
        name: props[key] for key, name in _PROPERTY_NAMES.items() if key in props
    }
    if codec.CORRELATION_DATA in props:
        out["correlation_data_b64"] = base64.b64encode(props[codec.CORRELATION_DATA]).decode()
    if codec.USER_PROPERTY in props:
        out["user_properties"] = [list(pair) for pair in props[codec.USER_PROPERTY]]
    return out


def properties_from_json(obj: Any) -> codec.Properties:
    """The inverse of ``properties_to_json``, for records read back (replay): every type
    is checked, so a mistyped property is this record's error and nothing later's."""
    if not isinstance(obj, dict):
        raise TypeError("properties must be an object")
    props: codec.Properties = {}
    for key, name in _PROPERTY_NAMES.items():
        if name not in obj:
            continue
        value = obj[name]
        if key in (codec.CONTENT_TYPE, codec.RESPONSE_TOPIC):
            props[key] = _mqtt_text(value, name)
        elif type(value) is not int or not 0 <= value <= _LIMITS[key]:
            raise TypeError(f"properties.{name} must be an integer 0-{_LIMITS[key]}")
        else:
            props[key] = value
    if "correlation_data_b64" in obj:
        text = _mqtt_text(obj["correlation_data_b64"], "correlation_data_b64")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, TypeError):
            raise TypeError("properties.correlation_data_b64 must be base64") from None
        props[codec.CORRELATION_DATA] = data
    if "user_properties" in obj:
        pairs = obj["user_properties"]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 for p in pairs
        ):
            raise TypeError("properties.user_properties must be a list of [key, value] pairs")
        props[codec.USER_PROPERTY] = [
            (_mqtt_text(k, "user_properties"), _mqtt_text(v, "user_properties")) for k, v in pairs
        ]
    return props


_LIMITS = {codec.PAYLOAD_FORMAT: 1, codec.MESSAGE_EXPIRY: 0xFFFFFFFF}


def _mqtt_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or len(value.encode()) > 65535 or "\x00" in value:
        raise TypeError(f"properties.{name} must be text of at most 65535 bytes, without NUL")
    return value


def record(env: Envelope, direction: str, instance: str, route: str) -> dict[str, Any]:
    """The archive record of a message: what the source sent, and where it went."""
    msg = env.source
    return {
        "topic": msg.topic,
        "target_topic": env.topic.decode(),
        "payload_b64": base64.b64encode(msg.payload).decode(),
        "qos": msg.qos,
        "retain": msg.retain,
        "properties": properties_to_json(msg.properties),
        "received_at": env.received_epoch,
        "direction": direction,
        "instance": instance,
        "route": route,
    }


def object_key(
    prefix: str, kind: str, direction: str, instance: str, first: float, seq: int
) -> str:
    when = dt.datetime.fromtimestamp(first, dt.UTC)
    root = f"{prefix}{direction}/" if kind == ARCHIVE else f"{prefix}{DEAD_LETTER}/{direction}/"
    return (
        f"{root}dt={when:%Y-%m-%d}/hour={when:%H}/{instance}-{int(first * 1000)}-{seq:06d}.jsonl.gz"
    )


@dataclass(eq=False)
class Batch:
    kind: str
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    first_received: float = 0.0  # epoch seconds
    started: float = 0.0  # loop time of the first record
    on_durable: list[Callable[[], None]] = field(default_factory=list)


@dataclass(frozen=True)
class ArchiveSettings:
    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str | None
    required: bool
    flush_interval: float
    max_batch_bytes: int
    max_buffer_bytes: int
    max_uploads: int = 4  # objects being written at once
    # `required`: flow.max_inflight. Batches holding acknowledgements are sealed by
    # seal_now() against it instead of waiting for their timer.
    flow_limit: int | None = None


def seal_now(
    open_holds: int, sealed_holds: int, flow_limit: int, writers_busy: int, max_uploads: int
) -> bool:
    """Whether a batch holding ``open_holds`` acknowledgements goes to S3 now.

    Every message in flight waits for its batch. The open batch may take half of the flow
    that sealed batches (written, or waiting for a writer) leave: with nothing else under
    way it grows to half the flow, and the more S3 lags behind, the earlier the next one
    goes, so several are written at once and the flow never waits for a timer. While every
    writer is busy it keeps growing instead: sealed, it would only wait in line, and a
    line of one-record objects would cost more than it saves.
    """
    if writers_busy >= max_uploads:
        return False
    return open_holds * 2 >= flow_limit - sealed_holds


ClientFactory = Callable[[ArchiveSettings], contextlib.AbstractAsyncContextManager[Any]]


def s3_client(settings: ArchiveSettings) -> contextlib.AbstractAsyncContextManager[Any]:
    """An aiobotocore S3 client (credentials from the standard AWS chain)."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    # One attempt per call: the uploader retries with its own backoff and counts failures.
    config = AioConfig(connect_timeout=3, read_timeout=20, retries={"max_attempts": 1})
    client: contextlib.AbstractAsyncContextManager[Any] = get_session().create_client(
        "s3", region_name=settings.region, endpoint_url=settings.endpoint_url, config=config
    )
    return client


class S3Archive(Service):
    def __init__(
        self,
        settings: ArchiveSettings,
        direction: str,
        instance: str,
        client_factory: ClientFactory = s3_client,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._client_factory = client_factory
        self.direction = direction
        self.instance = instance
        self.required = settings.required
        # Counters read by /metrics.
        self.batches = 0
        self.bytes = 0
        self.records = 0
        self.failures = 0
        self.dropped = 0
        self.buffered = 0  # bytes in open and sealed batches
        self._open: dict[str, Batch] = {}
        self._sealed: deque[Batch] = deque()
        self._uploading: list[Batch] = []
        self._sealed_holds = 0  # acknowledgements waiting in sealed and uploading batches
        self._pressure = False  # the flow filled while every writer was busy
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._seq = 0
        self._loop = asyncio.get_running_loop()
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._log = structlog.get_logger().bind(component="archive", bucket=settings.bucket)

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._client = await self._stack.enter_async_context(self._client_factory(s))
        for i in range(s.max_uploads):
            self.spawn(self._upload_loop(), name=f"archive-upload-{i}")
        self.spawn(self._seal_loop(), name="archive-seal")

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        try:
            return await super().__aexit__(*exc_info)
        finally:
            await asyncio.shield(self._stack.aclose())

    # ---- hot path ------------------------------------------------------------------

    def add(self, kind: str, record: dict[str, Any], on_durable: Callable[[], None] | None) -> bool:
        """Queue one record. False (and counted) when best-effort archiving is over its budget."""
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if on_durable is None and self.buffered + len(line) > self.settings.max_buffer_bytes:
            self.dropped += 1
            return False
        batch = self._open.get(kind)
        if batch is None:
            batch = self._open[kind] = Batch(
                kind, first_received=record["received_at"], started=self._loop.time()
            )
        batch.lines.append(line)
        batch.size += len(line)
        self.buffered += len(line)
        full = batch.size >= self.settings.max_batch_bytes
        if on_durable is not None:
            batch.on_durable.append(on_durable)
            full = full or self._hurry(batch)
        if full:
            self._seal(kind)
        return True

    def _seal(self, kind: str) -> None:
        batch = self._open.pop(kind, None)
        if batch is not None and batch.lines:
            self._sealed_holds += len(batch.on_durable)
            self._sealed.append(batch)
            self._idle.clear()
            self._wake.set()

    def _hurry(self, batch: Batch) -> bool:
        """Whether a batch holding acknowledgements should go before its timer."""
        s = self.settings
        if s.flow_limit is None:
            return False
        busy = len(self._uploading) + len(self._sealed)
        return seal_now(
            len(batch.on_durable), self._sealed_holds, s.flow_limit, busy, s.max_uploads
        )

    def seal_held(self) -> None:
        """The flow is full (``Flow.on_full`` calls this): the open batches that hold
        acknowledgements go now, or as soon as a writer is free, not at their timer."""
        if len(self._uploading) + len(self._sealed) >= self.settings.max_uploads:
            self._pressure = True
            return
        self._pressure = False
        for kind, batch in list(self._open.items()):
            if batch.on_durable:
                self._seal(kind)

    def _writer_free(self) -> None:
        if self._pressure:
            self.seal_held()
            return
        for kind, batch in list(self._open.items()):
            if batch.on_durable and self._hurry(batch):
                self._seal(kind)

    @property
    def lag(self) -> float:
        """Age in seconds of the oldest record not yet in S3."""
        batches = (*self._sealed, *self._uploading, *self._open.values())
        oldest = [b.started for b in batches]
        return self._loop.time() - min(oldest) if oldest else 0.0

    @property
    def pending(self) -> int:
        return len(self._sealed) + len(self._uploading) + len(self._open)

    @property
    def uploads(self) -> int:
        """Objects being written now."""
        return len(self._uploading)

    # ---- background ----------------------------------------------------------------

    async def _seal_loop(self) -> None:
        interval = self.settings.flush_interval
        while True:
            await asyncio.sleep(interval / 4)
            now = self._loop.time()
            for kind, batch in list(self._open.items()):
                if now - batch.started >= interval:
                    self._seal(kind)

    async def _upload_loop(self) -> None:
        """One of ``max_uploads`` writers. Objects may land out of order; acknowledgements
        still leave in arrival order (``acks.AckQueue`` waits for the ones before)."""
        while True:
            while not self._sealed:
                self._wake.clear()
                await self._wake.wait()
            batch = self._sealed.popleft()
            self._uploading.append(batch)
            try:
                await self._upload(batch)
            finally:
                self._uploading.remove(batch)
            self._writer_free()
            if not self._sealed and not self._uploading:
                self._idle.set()

    async def _upload(self, batch: Batch) -> None:
        key = object_key(
            self.settings.prefix,
            batch.kind,
            self.direction,
            self.instance,
            batch.first_received,
            self._seq,
        )
        self._seq += 1
        body = await asyncio.to_thread(gzip.compress, b"".join(batch.lines), 6)
        backoff = Backoff(initial=0.5, cap=15.0)
        while True:
            try:
                await self._client.put_object(
                    Bucket=self.settings.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/x-ndjson",
                    ContentEncoding="gzip",
                )
                break
            except Exception as exc:  # botocore raises many types; every one means: retry
                self.failures += 1
                delay = backoff.next_delay()
                self._log.warning(
                    "archive.upload_failed", key=key, error=_short(exc), retry_in=round(delay, 2)
                )
                await asyncio.sleep(delay)
        self.batches += 1
        self.bytes += len(body)
        self.records += len(batch.lines)
        self.buffered -= batch.size
        self._sealed_holds -= len(batch.on_durable)
        for done in batch.on_durable:
            done()

    def seal_all(self) -> None:
        """Close the open batches now instead of at their flush interval."""
        for kind in list(self._open):
            self._seal(kind)

    async def flush(self) -> None:
        """Seal what is open and wait until every batch is in S3."""
        for kind in list(self._open):
            self._seal(kind)
        await self._idle.wait()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "…"
