"""`mqtt-bridge replay`: re-drive archived messages from S3 to the configured target.

Objects are read in time order (partition, then first-record time, then sequence),
filtered, and republished through the same paced target pool a worker uses, under
client ids of their own (``<instance_id>-replay-<n>``) so a running worker is never
kicked off. MQTT 5 copies carry ``bridge-replay`` and the hop marker user properties.

Everything read from S3 is untrusted (``archive_reader``): a bad key or a bad record is
reported and skipped, an object broken as a whole is reported and replayed not at all,
and memory stays bounded whatever an object inflates to. S3 and the target get a
bounded number of tries; then replay gives up with one line. The summary is always
printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog

from bridge import mqtt_codec as codec
from bridge.acks import Pending
from bridge.archive import DEAD_LETTER
from bridge.archive_reader import BadRecord, ObjectError, ReadLimits, Record, read_records
from bridge.config import HOP_MARKER, BridgeConfig
from bridge.message import Envelope
from bridge.outcome import DELIVERED, Outcome
from bridge.pacing import TokenBucket
from bridge.policy import POISON_DROPS
from bridge.routing import TopicFilter
from bridge.urls import redact_url
from bridge.wiring import make_target

REPLAY_MARKER = "bridge-replay"
_PARTITION = re.compile(
    r"dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/(?:.*/)?([^/]+)-(\d+)-(\d+)\.jsonl\.gz$"
)
# Tries before replay gives up: S3 calls (botocore's own retries) and target connects.
S3_TRIES = 3
CONNECT_TRIES = 5
# At most this many bad-record lines in the summary; the count has them all.
_DETAILS = 50


class GiveUp(Exception):
    """Replay cannot go on (S3 or the target keeps failing): one line, after the summary."""


@dataclass
class ReplayOptions:
    source: str  # s3://bucket/prefix
    since: float | None = None
    until: float | None = None
    route: str | None = None
    topic_filter: str | None = None
    rate: float | None = None
    to_source_topic: bool = False
    dry_run: bool = False
    progress_every: float = 10.0  # seconds between progress lines when stderr is no terminal
    limits: ReadLimits = field(default_factory=ReadLimits)
    connect_tries: int = CONNECT_TRIES


@dataclass
class Summary:
    objects: int = 0
    messages: int = 0
    published: int = 0
    skipped: int = 0
    errors: int = 0
    rejected: int = 0
    bad_records: int = 0
    error_details: list[str] = field(default_factory=list)
    dry_run: bool = False
    gave_up: str | None = None  # why replay stopped early, or None

    def lines(self) -> list[str]:
        published = (
            f"would be published: {self.published}   (dry run: nothing was sent)"
            if self.dry_run
            else f"published: {self.published}"
        )
        return [
            f"objects:   {self.objects}",
            f"messages:  {self.messages}",
            published,
            f"skipped:   {self.skipped}   (outside --since/--until, --route or --topic-filter)",
            f"rejected:  {self.rejected}   (refused by the target)",
            f"bad:       {self.bad_records}   (unreadable or invalid records, skipped)",
            f"errors:    {self.errors}   (corrupt objects and bad keys, skipped)",
            *(f"  {detail}" for detail in self.error_details),
            *([f"stopped early: {self.gave_up}"] if self.gave_up else []),
        ]

    def detail(self, text: str) -> None:
        if len(self.error_details) < _DETAILS:
            self.error_details.append(text)
        elif len(self.error_details) == _DETAILS:
            self.error_details.append("… (more in the log)")


def parse_time(text: str) -> float:
    """Epoch seconds, or ISO 8601 (a missing zone means UTC)."""
    try:
        value = float(text)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"not a time: {text!r} (ISO 8601 or epoch seconds)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        value = when.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"not a time: {text!r}")
    return value


def _sort_key(key: str) -> tuple[str, str, int, int, str]:
    found = _PARTITION.search(key)
    if found is None:
        return ("", "", 0, 0, key)
    day, hour, _instance, first_ms, seq = found.groups()
    return (day, hour, int(first_ms), int(seq), key)


def _in_window(key: str, since: float | None, until: float | None) -> bool:
    """Partition pruning: skip whole hours outside the window. Raises ValueError for a
    key whose partition is no hour at all (``dt=2023-13-45``).

    An object sits in the hour of its first record; its last may be later (a batch open
    across the hour, a dead letter written long after receipt): one hour of margin.
    """
    found = _PARTITION.search(key)
    if found is None:
        return True
    try:
        start = dt.datetime.strptime(f"{found.group(1)} {found.group(2)}", "%Y-%m-%d %H")
    except ValueError:
        raise ValueError(f"dt={found.group(1)}/hour={found.group(2)} is no hour") from None
    start_ts = start.replace(tzinfo=dt.UTC).timestamp()
    if since is not None and start_ts + 2 * 3600 <= since:
        return False
    return until is None or start_ts < until


def _s3_error(exc: BaseException) -> str:
    """A botocore error in one line, without credentials (an endpoint URL may show)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code, message = error.get("Code", ""), error.get("Message", "")
        text = f"{code}: {message}" if code else str(exc)
    else:
        text = str(exc) or type(exc).__name__
    return redact_url(" ".join(text.split()))[:300]


def _no_source(pending: Pending) -> None:
    """Replay has no source acknowledgement to release."""


class Replayer:
    def __init__(self, cfg: BridgeConfig, opts: ReplayOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.summary = Summary(dry_run=opts.dry_run)
        self._filter = TopicFilter.parse(opts.topic_filter) if opts.topic_filter else None
        self._log = structlog.get_logger().bind(component="replay")
        self._outstanding = 0
        self._room = asyncio.Event()
        self._room.set()
        self._done = asyncio.Event()
        self._v5 = cfg.target.protocol == "5"
        self._progress_at = self._started = time.monotonic()
        self._bucket = TokenBucket(opts.rate, 0.1, time.monotonic()) if opts.rate else None
        self._total_objects = 0

    async def run(self) -> Summary:
        """Replay; the summary says how far it got. Raises ValueError for a bad --from."""
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        parts = urlsplit(self.opts.source)
        if parts.scheme != "s3" or not parts.netloc or "@" in parts.netloc:
            shown = redact_url(self.opts.source)
            raise ValueError(f"--from must look like s3://bucket/prefix, got {shown!r}")
        bucket, prefix = parts.netloc, parts.path.lstrip("/")
        s3 = self.cfg.backup.s3
        # botocore retries a failed call itself (S3_TRIES in all); then replay gives up.
        config = AioConfig(
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": S3_TRIES, "mode": "standard"},
        )
        try:
            async with get_session().create_client(
                "s3",
                region_name=s3.region if s3 else None,
                endpoint_url=s3.endpoint_url if s3 else None,
                config=config,
            ) as client:
                keys = await self._list(client, bucket, prefix)
                self._total_objects = len(keys)
                if self.opts.dry_run:
                    for key in keys:
                        await self._replay_object(client, bucket, key, None)
                else:
                    await self._replay_to_target(client, bucket, keys)
        except GiveUp as exc:
            self.summary.gave_up = str(exc)
        self._progress(final=True)
        return self.summary

    async def _replay_to_target(self, client: Any, bucket: str, keys: list[str]) -> None:
        pool = make_target(
            self.cfg,
            self._on_done,
            client_tag="replay",
            needed_qos=1,  # archived QoS 1 messages go out as QoS 1
            connect_tries=self.opts.connect_tries,
        )
        async with pool:
            work = asyncio.ensure_future(self._replay_all(client, bucket, keys, pool))
            failed = asyncio.ensure_future(pool.wait_failed())
            await asyncio.wait({work, failed}, return_when=asyncio.FIRST_COMPLETED)
            for task in (work, failed):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await pool.close()
        # Outside the pool's task group, which would wrap it in an ExceptionGroup.
        if not work.cancelled():
            work.result()  # a GiveUp from S3, or done
        elif not failed.cancelled():
            raise GiveUp(f"target: {failed.result()}")

    async def _replay_all(self, client: Any, bucket: str, keys: list[str], pool: Any) -> None:
        for key in keys:
            await self._replay_object(client, bucket, key, pool)
        while self._outstanding:
            self._done.clear()
            await self._done.wait()

    async def _list(self, client: Any, bucket: str, prefix: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        keys: list[str] = []
        include_dead = DEAD_LETTER in prefix
        paginator = client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if not key.endswith(".jsonl.gz"):
                        continue
                    if not include_dead and f"{DEAD_LETTER}/" in key[len(prefix) :]:
                        continue
                    try:
                        wanted = _in_window(key, self.opts.since, self.opts.until)
                    except ValueError as exc:
                        self._bad_key(key, str(exc))
                        continue
                    if wanted:
                        keys.append(key)
        except (BotoCoreError, ClientError) as exc:
            raise GiveUp(f"cannot list s3://{bucket}/{prefix}: {_s3_error(exc)}") from None
        return sorted(keys, key=_sort_key)

    def _bad_key(self, key: str, why: str) -> None:
        self.summary.errors += 1
        self.summary.detail(f"{key}: bad key: {why}")
        self._log.error("replay.bad_key", key=key, error=why)

    async def _fetch(self, client: Any, bucket: str, key: str) -> bytes | None:
        """The object's compressed bytes; None (reported) when it cannot be used."""
        from botocore.exceptions import BotoCoreError, ClientError

        limit = self.opts.limits.max_object_bytes
        try:
            response = await client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as stream:
                # Counted as it comes: a Content-Length is not a promise.
                chunks, size = [], int(response.get("ContentLength") or 0)
                if size <= limit:
                    size = 0
                    async for chunk in stream.iter_chunks(1024 * 1024):
                        size += len(chunk)
                        if size > limit:
                            break
                        chunks.append(chunk)
                    else:
                        return b"".join(chunks)
            self._corrupt(key, f"over --max-object-bytes {limit} compressed")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise GiveUp(f"cannot read s3://{bucket}/{key}: {_s3_error(exc)}") from None
            self._corrupt(key, "gone (deleted since the listing)")
        except (TimeoutError, BotoCoreError, OSError) as exc:
            raise GiveUp(f"cannot read s3://{bucket}/{key}: {_s3_error(exc)}") from None
        return None

    def _corrupt(self, key: str, why: str) -> None:
        self.summary.errors += 1
        self.summary.detail(f"{key}: {why}")
        self._log.error("replay.corrupt_object", key=key, error=why)

    async def _replay_object(self, client: Any, bucket: str, key: str, pool: Any) -> None:
        self.summary.objects += 1
        raw = await self._fetch(client, bucket, key)
        if raw is None:
            return
        limits = self.opts.limits
        try:
            # A first pass checks the object as a whole, keeping nothing: an object cut
            # short or over the bound is replayed not at all, rather than half.
            for _ in read_records(raw, limits):
                pass
        except ObjectError as exc:
            self._corrupt(key, str(exc))
            return
        for item in read_records(raw, limits):
            if isinstance(item, BadRecord):
                self.summary.bad_records += 1
                self.summary.detail(f"{key} line {item.line}: {item.reason}")
                self._log.warning("replay.bad_record", key=key, line=item.line, error=item.reason)
                continue
            self.summary.messages += 1
            if not self._selected(item):
                self.summary.skipped += 1
                continue
            if pool is None:
                self.summary.published += 1  # dry run: would publish
            else:
                await self._publish(pool, item)
            self._progress()

    def _selected(self, record: Record) -> bool:
        at = record.received_at
        o = self.opts
        if (o.since is not None and at < o.since) or (o.until is not None and at >= o.until):
            return False
        if o.route is not None and record.route != o.route:
            return False
        return self._filter is None or self._filter.matches(record.topic)

    async def _publish(self, pool: Any, record: Record) -> None:
        if self._bucket is not None:
            while wait := self._bucket.delay(1, time.monotonic()):  # noqa: ASYNC110 - pacing: waiting is the point
                await asyncio.sleep(wait)
        while self._outstanding >= 2 * self.cfg.flow.max_inflight:
            self._room.clear()
            await self._room.wait()
        topic = record.topic if self.opts.to_source_topic else record.target_topic
        payload = record.payload
        props: codec.Properties | None = None
        if self._v5:
            props = record.properties
            props.pop(codec.MESSAGE_EXPIRY, None)  # an archived expiry is long past
            props[codec.USER_PROPERTY] = [
                *props.get(codec.USER_PROPERTY, []),
                (REPLAY_MARKER, self.cfg.instance_id),
                (HOP_MARKER, self.cfg.instance_id),
            ]
        qos = min(record.qos, 1)
        msg = codec.Publish(record.topic, payload, qos, record.retain, False, 0, props)
        # No source to acknowledge: the target's outcome (``_on_done``) is the end of it.
        pending = Pending(0, qos, len(payload), 0, _no_source)
        env = Envelope(
            source_topic=record.topic, topic=topic.encode(), payload=payload, qos=qos,
            retain=record.retain, properties=props, received_at=0.0, expires_at=None,
            route=0, pending=pending, source=msg, received_epoch=record.received_at,
        )  # fmt: skip
        self._outstanding += 1
        pool.submit(env)

    def _on_done(self, env: Envelope, outcome: Outcome) -> None:
        self._outstanding -= 1
        if outcome is DELIVERED:
            self.summary.published += 1
        else:
            self.summary.rejected += 1
            self._log.warning(
                "replay.rejected",
                topic=env.topic.decode(),
                reason=outcome.dead_letter_reason(POISON_DROPS)[0],
            )
        if self._outstanding < self.cfg.flow.max_inflight:
            self._room.set()
        if not self._outstanding:
            self._done.set()

    def _progress(self, final: bool = False) -> None:
        """A terminal gets one line redrawn twice a second. Anything else (a Kubernetes Job's
        log, a file) gets a line every ``progress_every`` seconds, with rate and ETA."""
        now = time.monotonic()
        tty = sys.stderr.isatty()
        every = 0.5 if tty else self.opts.progress_every
        if not final and now - self._progress_at < every:
            return
        self._progress_at = now
        line = progress_line(self.summary, self._total_objects, now - self._started)
        if tty:
            print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def progress_line(s: Summary, total_objects: int, elapsed: float) -> str:
    """``objects 3/40  messages 1200  published 1180  …  rate 590 msg/s  eta 1m14s``.

    The rate counts messages read; the ETA assumes the objects left are like those read
    (batches are cut by time and size, so they are alike).
    """
    rate = s.messages / elapsed if elapsed > 0 else 0.0
    left = total_objects - s.objects
    eta = elapsed * left / s.objects if s.objects else None
    verb = "would publish" if s.dry_run else "published"
    return (
        f"objects {s.objects}/{total_objects}  messages {s.messages}  {verb} {s.published}  "
        f"skipped {s.skipped}  errors {s.errors}  rate {rate:.0f} msg/s  "
        f"eta {_duration(eta) if eta is not None else '?'}"
    )


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
