"""Who is consuming: the source broker itself is the registry of workers.

Every source connection (one session each) has a retained record at
``<root>/<direction>/<source client id>`` and a Will on the same topic that says
"gone". MQTT 5 delays the Will by ``membership.grace``: a worker that comes back within
it cancels the Will; one that does not is declared gone by the broker. A live worker
of the same direction that sees a "gone" record *adopts* the session: it connects with
that client id, forwards what is queued through its own routes with the same
end-to-end acknowledgement, ends the session and clears the record.

No coordination service: the records are retained messages, the failure detector is the
Will, and the adopter is chosen by rendezvous hashing over the live records, so that
usually exactly one worker acts. Two adopters are harmless: the second connection takes
the session over, and what the first had not acknowledged is redelivered (at least once).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import orjson
import structlog

from bridge import __version__
from bridge import mqtt_codec as codec
from bridge.config import BridgeConfig
from bridge.errors import ConnectionFailed
from bridge.failover import Failover
from bridge.link import Connection, ConnectionFactory, Link, PubackWaiters
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.mqtt_codec import Publish
from bridge.service import Service

State = Literal["live", "stopped", "gone"]


@dataclass(frozen=True, slots=True)
class MemberRecord:
    state: State
    instance: str
    client_id: str
    started: float  # epoch seconds
    updated: float  # epoch seconds: refreshed while live
    version: str
    incarnation: str  # random per process: tells a restarted worker from a duplicate

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @staticmethod
    def decode(payload: bytes) -> MemberRecord | None:
        """None for an empty (cleared) or foreign record: never trust a peer's bytes."""
        try:
            raw = orjson.loads(payload)
            record = MemberRecord(**raw)
        except (orjson.JSONDecodeError, TypeError):
            return None
        if record.state not in ("live", "stopped", "gone"):
            return None
        return record


def member_topic(root: str, direction: str, client_id: str) -> str:
    return f"{root}/{direction}/{client_id}"


def adopter_rank(gone: str, live: list[str], me: str) -> int | None:
    """Our place among the live workers for adopting ``gone`` (0: first), or None when
    we are not live. Rendezvous hashing: every worker computes the same order from the
    same records, and a worker leaving moves only its own adoptions."""

    def weight(member: str) -> bytes:
        return hashlib.sha256(f"{gone}\x00{member}".encode()).digest()

    order = sorted(set(live), key=weight, reverse=True)
    return order.index(me) if me in order else None


@dataclass(frozen=True, slots=True)
class Settings:
    root: str
    direction: str
    instance: str
    grace: int  # the Will Delay Interval
    refresh: float  # seconds between refreshes of a live record
    v5: bool


class RegistryLink(Link):
    """The registry's own connection: reads every record of our direction, writes ours."""

    side = "membership"

    def __init__(
        self,
        endpoint: Endpoint,
        options: SessionOptions,
        connect_timeout: float,
        subscription: str,
        on_record: Callable[[str, bytes, bool], None],
        factory: ConnectionFactory,
        failover: Failover | None = None,
    ) -> None:
        super().__init__(0, endpoint, options, connect_timeout, 0.0, factory, failover)
        self.conn: Connection | None = None
        self.ready = asyncio.Event()
        self._subscription = subscription
        self._on_record = on_record
        self._acks = PubackWaiters()

    async def _on_connect(self, conn: Connection) -> None:
        self.conn = conn
        # Retain As Published off: a record that arrives retained was stored before we
        # subscribed; one that arrives live was written just now (duplicate detection).
        codes = await conn.subscribe([(self._subscription, 1)], retain_as_published=False)
        if not codes or codes[0] >= 0x80:
            raise ConnectionFailed(f"subscription to {self._subscription} refused")
        self._did_work()
        self.ready.set()

    async def publish(self, topic: str, payload: bytes, timeout: float = 5.0) -> bool:
        """A retained QoS 1 publish; True once the broker acknowledged it."""
        conn = self.conn
        if conn is None:
            return False
        packet_id = conn.publish(topic.encode(), payload, 1, True)
        return await self._acks.wait(packet_id, timeout)

    def on_message(self, conn: Connection, msg: Publish) -> bool:
        if msg.qos:
            conn.puback(msg.packet_id)
        self._on_record(msg.topic, msg.payload, msg.retain)
        return True

    def on_puback(self, conn: Connection, packet_id: int, reason_code: int) -> None:
        self._acks.answer(packet_id, reason_code)

    def on_writable(self, conn: Connection, writable: bool) -> None:
        """A handful of small records: nothing to pace."""

    def on_connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        if conn is self.conn:
            self.conn = None
            self.ready.clear()
            self._acks.lost()

    async def close(self) -> None:
        self._stopping = True
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect()


Adopt = Callable[[str], Awaitable[bool]]


class Registry(Service):
    """Our records, everyone's records, and the adoption of sessions that were left."""

    def __init__(
        self,
        settings: Settings,
        client_ids: list[str],
        endpoint: Endpoint,
        options: SessionOptions,
        connect_timeout: float,
        adopt: Adopt,
        on_fatal: Callable[[str], None],
        factory: ConnectionFactory = MqttConnection,
        failover: Failover | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._on_fatal = on_fatal
        self.client_ids = client_ids
        self.records: dict[str, MemberRecord] = {}
        self.adoptions = 0
        self.adoption_failures = 0
        self._adopt = adopt
        self._adopting: set[str] = set()
        self._incarnation = secrets.token_hex(8)
        self._started = time.time()
        self._log = structlog.get_logger().bind(component="membership")
        self._link = RegistryLink(
            endpoint,
            options,
            connect_timeout,
            f"{settings.root}/{settings.direction}/+",
            self._on_record,
            factory,
            failover,
        )

    # ---- records ---------------------------------------------------------------------

    def topic(self, client_id: str) -> str:
        s = self.settings
        return member_topic(s.root, s.direction, client_id)

    def record(self, client_id: str, state: State) -> MemberRecord:
        return MemberRecord(
            state,
            self.settings.instance,
            client_id,
            self._started,
            time.time(),
            __version__,
            self._incarnation,
        )

    def will(self, client_id: str) -> codec.Will:
        """The Will of one source connection: its record, saying "gone"."""
        payload = self.record(client_id, "gone").encode()
        delay = self.settings.grace if self.settings.v5 else 0
        return codec.Will(self.topic(client_id), payload, qos=1, retain=True, delay=delay)

    def _on_record(self, topic: str, payload: bytes, retained: bool) -> None:
        client_id = topic.rsplit("/", 1)[-1]
        record = MemberRecord.decode(payload) if payload else None
        if record is None:
            self.records.pop(client_id, None)
            return
        if (
            client_id in self.client_ids
            and not retained
            and record.state == "live"
            and record.incarnation != self._incarnation
        ):
            self._duplicate(client_id, record)
            return
        self.records[client_id] = record
        if record.state == "gone" and client_id not in self.client_ids:
            self._consider(client_id)

    def live_instances(self) -> list[str]:
        """Instances with a fresh live record (a stale one is a worker that died
        within its grace: its Will has not fired yet)."""
        fresh = time.time() - 3 * self.settings.refresh
        return sorted(
            {r.instance for r in self.records.values() if r.state == "live" and r.updated >= fresh}
        )

    def _duplicate(self, client_id: str, other: MemberRecord) -> None:
        """Another running process writes our record now (a crashed predecessor cannot:
        its last record comes retained). The younger of the two stops."""
        s = self.settings
        if (other.started, other.incarnation) < (self._started, self._incarnation):
            self._on_fatal(
                f"another live worker uses client id {client_id!r} (started "
                f"{time.time() - other.started:.0f} s ago): two workers share instance_id "
                f"{s.instance!r}; give each its own"
            )
        else:
            self._log.error(
                "membership.duplicate_instance",
                client_id=client_id,
                note="a newer worker with our instance_id started; it stops itself",
            )

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.spawn(self._link.run(), name="membership")
        async with asyncio.timeout(30):
            await self._link.ready.wait()
        await asyncio.sleep(0.3)  # the retained records arrive right after SUBACK
        await self._publish_all("live")
        self.spawn(self._refresh_loop(), name="membership-refresh")
        for client_id, record in list(self.records.items()):
            if record.state == "gone" and client_id not in self.client_ids:
                self._consider(client_id)

    async def _publish_all(self, state: State) -> None:
        for client_id in self.client_ids:
            if not await self._link.publish(
                self.topic(client_id), self.record(client_id, state).encode()
            ):
                self._log.warning("membership.record_not_written", client_id=client_id, state=state)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh)
            await self._link.ready.wait()
            await self._publish_all("live")

    async def leave(self, states: Mapping[str, State | None]) -> None:
        """Write our final records: None clears one (the session ended)."""
        for client_id, state in states.items():
            payload = b"" if state is None else self.record(client_id, state).encode()
            await self._link.publish(self.topic(client_id), payload)

    async def close(self) -> None:
        await self._link.close()

    # ---- adoption --------------------------------------------------------------------

    def _consider(self, client_id: str) -> None:
        if client_id in self._adopting:
            return
        self._adopting.add(client_id)
        self.spawn(self._maybe_adopt(client_id), name=f"adopt-{client_id}")

    async def _maybe_adopt(self, client_id: str) -> None:
        try:
            rank = adopter_rank(client_id, self.live_instances(), self.settings.instance)
            if rank is None:
                return
            # The first in rank acts now; the next ones only if it did not (the record
            # is still "gone" after their turn's wait).
            await asyncio.sleep(rank * self.settings.grace)
            record = self.records.get(client_id)
            if record is None or record.state != "gone":
                return
            gone_for = time.time() - record.updated
            self._log.warning(
                "membership.adopting",
                client_id=client_id,
                instance=record.instance,
                rank=rank,
                gone_for=round(gone_for, 1),
            )
            if await self._adopt(client_id):
                self.adoptions += 1
                await self._link.publish(self.topic(client_id), b"")
            else:
                self.adoption_failures += 1
        finally:
            self._adopting.discard(client_id)


def settings_of(cfg: BridgeConfig) -> Settings:
    m = cfg.membership
    return Settings(
        m.topic_root, cfg.direction, cfg.instance_id, m.grace, m.refresh, cfg.source.protocol == "5"
    )
