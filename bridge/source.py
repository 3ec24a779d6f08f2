"""The source side: persistent sessions that consume every route's subscription.

Usually one connection. A broker that caps subscriptions per connection (AWS IoT
Core: 50) gets several, each with its own stable client id, session and in-order
acknowledgement queue; all share one flow bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace

from bridge.acks import AckQueue
from bridge.errors import ConnectionFailed
from bridge.failover import Failover
from bridge.flow import Flow
from bridge.leave import LinkExit, LinkLeave, SessionMode, plan_exit, plan_leave
from bridge.link import Connection, ConnectionFactory, Link, LinkStats
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.mqtt_codec import SESSION_TAKEN_OVER, Publish, reason_name
from bridge.service import Service
from bridge.stats import Stats

Handler = Callable[[AckQueue, Publish], bool]


class SourceLink(Link):
    """One source connection: connects with clean start off, so a restarted worker
    resumes its session and gets back what it had not acknowledged."""

    side = "source"

    def __init__(
        self,
        index: int,
        endpoint: Endpoint,
        options: SessionOptions,
        subscriptions: list[tuple[str, int]],
        per_subscribe: int | None,
        connect_interval: float,
        flow: Flow,
        handler: Handler,
        connect_timeout: float,
        stats: Stats,
        factory: ConnectionFactory = MqttConnection,
        failover: Failover | None = None,
        optional: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(
            index, endpoint, options, connect_timeout, connect_interval, factory, failover
        )
        self.subscriptions = subscriptions
        self.optional = optional  # filters whose refusal does not fail the connection
        self.per_subscribe = per_subscribe or len(subscriptions)
        self.flow = flow
        self.subscribed = False
        self.last_received = 0.0
        self.released: set[str] = set()  # given up while the target is down (release.py)
        self.sessions_lost = 0  # reconnects that found no session: its backlog is gone
        self._had_session = False
        self._received = 0  # admitted on earlier connections
        self._handler = handler
        self._stats = stats
        self._conn: Connection | None = None
        self._acks: AckQueue | None = None
        self._detached: list[AckQueue] = []

    def stats(self) -> LinkStats:
        # A lost connection's queue still holds messages until the target answers them.
        self._detached = [queue for queue in self._detached if len(queue)]
        queues = [*self._detached, *([self._acks] if self._acks is not None else [])]
        times = [t for t in (queue.oldest() for queue in queues) if t is not None]
        received = self._received + (self._acks.admitted if self._acks is not None else 0)
        return LinkStats(
            self.index,
            self.subscribed,
            self.reconnects,
            sessions_lost=self.sessions_lost,
            oldest=min(times) if times else None,
            received=received,
            protocol_errors=dict(self.protocol_errors),
            problem=self.problem,
        )

    # ---- link hooks ----------------------------------------------------------------

    def _on_new(self, conn: Connection) -> None:
        # Messages of a resumed session may arrive right after CONNACK, before SUBACK.
        if self._acks is not None and len(self._acks):
            self._detached.append(self._acks)
        if self._acks is not None:
            self._received += self._acks.admitted
        self._conn, self._acks = conn, AckQueue(self.flow, conn, self._stats)

    async def _on_connect(self, conn: Connection) -> None:
        if self._had_session and not conn.session_present:
            self.sessions_lost += 1
            self._log.warning(
                "source.session_lost",
                endpoint=str(self.endpoint),
                client_id=self.options.client_id,
                note="the broker no longer had our session: what it held for us is gone "
                "(broker restarted without persistence, or session_expiry passed)",
            )
        else:
            self._log.info(
                "source.connected",
                endpoint=str(self.endpoint),
                client_id=self.options.client_id,
                session_present=conn.session_present,
            )
        self._had_session = True
        if self._stopping:
            return  # told to leave while connecting: take nothing new
        await self._subscribe(conn)

    async def _subscribe(self, conn: Connection) -> None:
        # Every reconnect, whatever session_present says: Mosquitto 2.0.11 does not
        # restore a persistent session's $share subscription after a broker restart.
        refused = []
        step = self.per_subscribe
        wanted = [(f, qos) for f, qos in self.subscriptions if f not in self.released]
        for start in range(0, len(wanted), step):
            batch = wanted[start : start + step]
            # Retain As Published: a route with `retain: true` must see the publisher's flag.
            codes = await conn.subscribe(batch, retain_as_published=True)
            if len(codes) != len(batch):
                raise ConnectionFailed("SUBACK does not answer every filter")
            for (topic, _), code in zip(batch, codes, strict=True):
                if code < 0x80:
                    continue
                if topic in self.optional:
                    # The heartbeat's: readiness says so; traffic must not stop for it.
                    self._log.error(
                        "source.subscription_refused", filter=topic, reason=reason_name(code)
                    )
                else:
                    refused.append(f"{topic} ({reason_name(code)})")
        if refused:
            raise ConnectionFailed(f"subscription refused: {', '.join(refused)}")
        self.subscribed = True
        self._did_work()
        self._log.info("source.subscribed", filters=[topic for topic, _ in self.subscriptions])

    async def release(self, filters: set[str]) -> None:
        """Give ``filters`` up until ``rejoin``; they stay given up across reconnects."""
        filters &= set(self.filters) - self.released
        self.released |= filters
        conn = self._conn
        if filters and conn is not None and conn.is_open:
            try:
                await conn.unsubscribe(sorted(filters), timeout=5.0)
            except ConnectionFailed as exc:
                self._log.warning("source.unsubscribe_failed", error=str(exc))

    async def rejoin(self, filters: set[str]) -> None:
        if self._stopping:
            return  # leaving: nothing new
        filters &= self.released
        self.released -= filters
        conn = self._conn
        if filters and conn is not None and conn.is_open:
            batch = [(f, qos) for f, qos in self.subscriptions if f in filters]
            try:
                await conn.subscribe(batch, retain_as_published=True)
            except ConnectionFailed as exc:
                self._log.warning("source.subscribe_failed", error=str(exc))

    def wake(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    # ---- mqtt.Listener -------------------------------------------------------------

    def on_message(self, conn: Connection, msg: Publish) -> bool:
        acks = self._acks
        if conn is not self._conn or acks is None:
            return True
        self.last_received = conn.last_rx
        return self._handler(acks, msg)

    def on_puback(self, conn: Connection, packet_id: int, reason_code: int) -> None:
        """The source side never publishes."""

    def on_writable(self, conn: Connection, writable: bool) -> None:
        """Only PUBACKs go out on this side; they are bounded by the flow."""

    def on_connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        if conn is not self._conn:
            return
        if self._acks is not None:
            self._acks.detach()
        was_subscribed, self.subscribed = self.subscribed, False
        taken_over = conn.disconnect_reason == SESSION_TAKEN_OVER  # the link says so once
        if was_subscribed and not self._stopping and not taken_over:
            self._log.warning("source.disconnected", reason=str(exc) if exc else "closed")

    # ---- graceful leave ------------------------------------------------------------

    def stop_taking(self) -> None:
        """From now on, no reconnect and no new subscription."""
        self._stopping = True

    def stop_reading(self) -> None:
        if self._conn is not None:
            self._conn.stop_reading()

    @property
    def has_unread(self) -> bool:
        return self._conn is not None and self._conn.has_unread

    async def unsubscribe(self, filters: tuple[str, ...], timeout: float = 5.0) -> None:
        """Give up ``filters``; what the broker already queued for us still comes."""
        conn = self._conn
        self.subscribed = False
        if conn is None or not conn.is_open or not filters:
            return
        try:
            for start in range(0, len(filters), self.per_subscribe):
                batch = list(filters[start : start + self.per_subscribe])
                await conn.unsubscribe(batch, timeout=5.0)
        except ConnectionFailed as exc:
            self._log.warning("source.unsubscribe_failed", error=str(exc))

    @property
    def filters(self) -> list[str]:
        return [topic for topic, _ in self.subscriptions]

    def leave_plan(self, mode: SessionMode) -> LinkLeave:
        """``leave.plan_leave`` over the traffic subscriptions; the bridge's own (the
        heartbeat's) decide nothing and are always given up."""
        plan = plan_leave(mode, [f for f in self.filters if f not in self.optional])
        own = tuple(f for f in self.filters if f in self.optional)
        return replace(plan, unsubscribe=plan.unsubscribe + own)

    def log_leave(self, action: str, why: str) -> None:
        self._log.info("source.leave", client_id=self.options.client_id, session=action, why=why)

    async def close(self, end_session: bool = False, with_will: bool = False) -> None:
        self._stopping = True
        conn = self._conn
        if conn is not None:
            await conn.disconnect(session_expiry=0 if end_session else None, with_will=with_will)

    async def adopt(self, quiet: float, timeout: float, can_end: bool) -> bool:
        """Drain a session a gone worker left: connect once with its client id, give up
        its subscriptions, forward what it holds (through our routes, acknowledged end to
        end as usual), then end it. False when it could not finish (the session stays)."""
        self._stopping = True  # one connection, no reconnect loop
        # Not one of Source's links: wake ourselves when the flow has room again.
        unwatch = self.flow.on_space(self.wake)
        try:
            return await self._adopt(quiet, timeout, can_end)
        finally:
            unwatch()

    async def _adopt(self, quiet: float, timeout: float, can_end: bool) -> bool:
        conn = self._factory(self.options, self)
        self._on_new(conn)
        try:
            await conn.connect(self.endpoint, self.connect_timeout)
        except ConnectionFailed as exc:
            self._log.warning("source.adopt_failed", error=str(exc))
            return False
        self._log.info(
            "source.adopting",
            client_id=self.options.client_id,
            session_present=conn.session_present,
        )
        # The session's queued messages come first; with the flow full (target down) the
        # UNSUBACK waits behind them until there is room: allow it the whole adoption.
        await self.unsubscribe(tuple(self.filters), timeout=timeout)
        loop = asyncio.get_running_loop()
        started = loop.time()
        acks = self._acks
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await asyncio.sleep(0.05)
                    if not conn.is_open:
                        return False  # taken over (the owner came back) or lost: it stays
                    idle = loop.time() - max(self.last_received, started)
                    if idle >= quiet and acks is not None and not len(acks) and not conn.has_unread:
                        break
        except TimeoutError:
            self._log.warning("source.adopt_timeout", client_id=self.options.client_id)
            await conn.disconnect()
            return False
        await conn.disconnect(session_expiry=0 if can_end else None)
        if not can_end:
            # MQTT 3.1.1 ends a session only by a clean-session connect.
            clean = self._factory(replace(self.options, clean_start=True), self)
            with contextlib.suppress(ConnectionFailed):
                await clean.connect(self.endpoint, self.connect_timeout)
                await clean.disconnect()
        return True


class Source(Service):
    def __init__(self, links: list[SourceLink], flow: Flow) -> None:
        super().__init__()
        self.links = links
        self._unwatch = flow.on_space(self._wake_all)
        self._plans: list[LinkLeave] = []

    async def start(self) -> None:
        for link in self.links:
            self.spawn(link.run(), name=f"source-{link.index}")

    def _wake_all(self) -> None:
        for link in self.links:
            link.wake()

    @property
    def subscribed(self) -> bool:
        return all(link.subscribed for link in self.links)

    def connections(self) -> list[LinkStats]:
        return [link.stats() for link in self.links]

    async def release(self, subscription: str) -> None:
        await asyncio.gather(*(link.release({subscription}) for link in self.links))

    async def rejoin(self, subscription: str) -> None:
        await asyncio.gather(*(link.rejoin({subscription}) for link in self.links))

    @property
    def last_received(self) -> float:
        return max(link.last_received for link in self.links)

    async def begin_leave(self, mode: SessionMode) -> None:
        """Stop taking: no reconnects; give up what others can take (``leave.plan_leave``).
        A session that stays stops reading at once: its unread messages wait in it."""
        self._plans = [link.leave_plan(mode) for link in self.links]
        for link in self.links:
            link.stop_taking()
        await asyncio.gather(
            *(
                link.unsubscribe(plan.unsubscribe)
                for link, plan in zip(self.links, self._plans, strict=True)
            )
        )
        for link, plan in zip(self.links, self._plans, strict=True):
            if plan.keep_session:
                link.stop_reading()

    def stop_reading(self) -> None:
        for link in self.links:
            link.stop_reading()

    @property
    def has_unread(self) -> bool:
        return any(link.has_unread for link in self.links)

    def exits(self, drained: bool, v5: bool) -> list[LinkExit]:
        """How each link ends (``leave.plan_exit``); a leave that never began keeps all."""
        plans = self._plans or [link.leave_plan("keep") for link in self.links]
        return [plan_exit(plan, drained, v5) for plan in plans]

    async def close(self, exits: list[LinkExit]) -> None:
        self._unwatch()
        for link, end in zip(self.links, exits, strict=True):
            link.log_leave(end.action, end.why)
        await asyncio.gather(
            *(
                link.close(end.end_session, end.with_will)
                for link, end in zip(self.links, exits, strict=True)
            )
        )
