"""`mqtt-bridge replay`: re-drive archived messages from S3 to the configured target.

Objects are read in time order (partition, then first-record time, then sequence),
filtered, and republished through the same paced target pool a worker uses, under
client ids of their own (``<instance_id>-replay-<n>``) so a running worker is never
kicked off. MQTT 5 copies carry ``bridge-replay`` and the hop marker user properties.
A corrupt object is reported and skipped; the rest goes on.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gzip
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import structlog

from bridge import mqtt_codec as codec
from bridge.acks import Pending
from bridge.archive import DEAD_LETTER, properties_from_json
from bridge.config import HOP_MARKER, BridgeConfig
from bridge.message import Envelope
from bridge.outcome import DELIVERED, Outcome
from bridge.pacing import TokenBucket
from bridge.policy import POISON_DROPS
from bridge.routing import TopicFilter
from bridge.wiring import make_target

REPLAY_MARKER = "bridge-replay"
_PARTITION = re.compile(
    r"dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/(?:.*/)?([^/]+)-(\d+)-(\d+)\.jsonl\.gz$"
)
_REQUIRED = ("topic", "target_topic", "payload_b64", "qos", "retain", "received_at")


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


@dataclass
class Summary:
    objects: int = 0
    messages: int = 0
    published: int = 0
    skipped: int = 0
    errors: int = 0
    rejected: int = 0
    error_details: list[str] = field(default_factory=list)
    dry_run: bool = False

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
            f"errors:    {self.errors}   (corrupt objects, skipped)",
            *(f"  {detail}" for detail in self.error_details),
        ]


def parse_time(text: str) -> float:
    """Epoch seconds, or ISO 8601 (a missing zone means UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _sort_key(key: str) -> tuple[str, str, int, int, str]:
    found = _PARTITION.search(key)
    if found is None:
        return ("", "", 0, 0, key)
    day, hour, _instance, first_ms, seq = found.groups()
    return (day, hour, int(first_ms), int(seq), key)


def _in_window(key: str, since: float | None, until: float | None) -> bool:
    """Partition pruning: skip whole hours outside the window.

    An object sits in the hour of its first record; its last may be later (a batch open
    across the hour, a dead letter written long after receipt): one hour of margin.
    """
    found = _PARTITION.search(key)
    if found is None:
        return True
    start = dt.datetime.strptime(f"{found.group(1)} {found.group(2)}", "%Y-%m-%d %H")
    start_ts = start.replace(tzinfo=dt.UTC).timestamp()
    if since is not None and start_ts + 2 * 3600 <= since:
        return False
    return until is None or start_ts < until


def _parse_object(raw: bytes) -> list[dict[str, Any]]:
    """All records of one object, or an exception: an object is replayed whole or not at all."""
    records = [orjson.loads(line) for line in gzip.decompress(raw).splitlines() if line]
    for record in records:
        missing = [k for k in _REQUIRED if k not in record]
        if missing:
            raise ValueError(f"record without {', '.join(missing)}")
        # Decode now what publishing will need, so nothing fails halfway through an object.
        record["payload"] = base64.b64decode(record["payload_b64"], validate=True)
        record["received_at"] = float(record["received_at"])
        record["qos"] = int(record["qos"])
        if not isinstance(record["topic"], str) or not isinstance(record["target_topic"], str):
            raise TypeError("topic and target_topic must be strings")
        record["props"] = properties_from_json(record.get("properties") or {})
    return records


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
        from aiobotocore.session import get_session

        parts = urlsplit(self.opts.source)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"--from must look like s3://bucket/prefix, got {self.opts.source!r}")
        bucket, prefix = parts.netloc, parts.path.lstrip("/")
        s3 = self.cfg.backup.s3
        async with get_session().create_client(
            "s3",
            region_name=s3.region if s3 else None,
            endpoint_url=s3.endpoint_url if s3 else None,
        ) as client:
            keys = await self._list(client, bucket, prefix)
            self._total_objects = len(keys)
            if self.opts.dry_run:
                for key in keys:
                    await self._replay_object(client, bucket, key, None)
            else:
                async with make_target(self.cfg, self._on_done, client_tag="replay") as pool:
                    for key in keys:
                        await self._replay_object(client, bucket, key, pool)
                    while self._outstanding:
                        self._done.clear()
                        await self._done.wait()
                    await pool.close()
        self._progress(final=True)
        return self.summary

    async def _list(self, client: Any, bucket: str, prefix: str) -> list[str]:
        keys: list[str] = []
        include_dead = DEAD_LETTER in prefix
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                if not key.endswith(".jsonl.gz"):
                    continue
                if not include_dead and f"{DEAD_LETTER}/" in key[len(prefix) :]:
                    continue
                if _in_window(key, self.opts.since, self.opts.until):
                    keys.append(key)
        return sorted(keys, key=_sort_key)

    async def _replay_object(self, client: Any, bucket: str, key: str, pool: Any) -> None:
        self.summary.objects += 1
        try:
            response = await client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as stream:
                raw = await stream.read()
            records = _parse_object(raw)
        except (
            OSError,
            EOFError,
            zlib.error,
            orjson.JSONDecodeError,
            ValueError,
            TypeError,
        ) as exc:
            self.summary.errors += 1
            detail = f"{key}: {type(exc).__name__}: {exc}"
            self.summary.error_details.append(detail)
            self._log.error("replay.corrupt_object", key=key, error=str(exc))
            return
        for record in records:
            self.summary.messages += 1
            if not self._selected(record):
                self.summary.skipped += 1
                continue
            if pool is None:
                self.summary.published += 1  # dry run: would publish
            else:
                await self._publish(pool, record)
            self._progress()

    def _selected(self, record: dict[str, Any]) -> bool:
        at = float(record["received_at"])
        o = self.opts
        if (o.since is not None and at < o.since) or (o.until is not None and at >= o.until):
            return False
        if o.route is not None and record.get("route") != o.route:
            return False
        return self._filter is None or self._filter.matches(record["topic"])

    async def _publish(self, pool: Any, record: dict[str, Any]) -> None:
        if self._bucket is not None:
            while wait := self._bucket.delay(1, time.monotonic()):  # noqa: ASYNC110 - pacing: waiting is the point
                await asyncio.sleep(wait)
        while self._outstanding >= 2 * self.cfg.flow.max_inflight:
            self._room.clear()
            await self._room.wait()
        topic = record["topic"] if self.opts.to_source_topic else record["target_topic"]
        payload = record["payload"]
        props: codec.Properties | None = None
        if self._v5:
            props = record["props"]
            props.pop(codec.MESSAGE_EXPIRY, None)  # an archived expiry is long past
            props[codec.USER_PROPERTY] = [
                *props.get(codec.USER_PROPERTY, []),
                (REPLAY_MARKER, self.cfg.instance_id),
                (HOP_MARKER, self.cfg.instance_id),
            ]
        qos = min(int(record["qos"]), 1)
        msg = codec.Publish(record["topic"], payload, qos, bool(record["retain"]), False, 0, props)
        # No source to acknowledge: the target's outcome (``_on_done``) is the end of it.
        pending = Pending(0, qos, len(payload), 0, _no_source)
        env = Envelope(
            source_topic=record["topic"], topic=topic.encode(), payload=payload, qos=qos,
            retain=bool(record["retain"]), properties=props, received_at=0.0, expires_at=None,
            route=0, pending=pending, source=msg, received_epoch=float(record["received_at"]),
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
