"""The source side: persistent sessions that consume every route's subscription.

Usually one connection. A broker that caps subscriptions per connection (AWS IoT
Core: 50) gets several, each with its own stable client id, session and in-order
acknowledgement queue; all share one flow bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bridge.acks import AckQueue
from bridge.errors import ConnectionFailed
from bridge.flow import Flow
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
    ) -> None:
        super().__init__(index, endpoint, options, connect_timeout, connect_interval, factory)
        self.subscriptions = subscriptions
        self.per_subscribe = per_subscribe or len(subscriptions)
        self.flow = flow
        self.subscribed = False
        self.last_received = 0.0
        self._handler = handler
        self._stats = stats
        self._conn: Connection | None = None
        self._acks: AckQueue | None = None

    def stats(self) -> LinkStats:
        return LinkStats(
            self.index,
            self.subscribed,
            self.reconnects,
            protocol_errors=dict(self.protocol_errors),
            problem=self.problem,
        )

    # ---- link hooks ----------------------------------------------------------------

    def _on_new(self, conn: Connection) -> None:
        # Messages of a resumed session may arrive right after CONNACK, before SUBACK.
        self._conn, self._acks = conn, AckQueue(self.flow, conn, self._stats)

    async def _on_connect(self, conn: Connection) -> None:
        self._log.info(
            "source.connected",
            endpoint=str(self.endpoint),
            client_id=self.options.client_id,
            session_present=conn.session_present,
        )
        if self._stopping:
            return  # told to leave while connecting: take nothing new
        await self._subscribe(conn)

    async def _subscribe(self, conn: Connection) -> None:
        refused = []
        step = self.per_subscribe
        for start in range(0, len(self.subscriptions), step):
            batch = self.subscriptions[start : start + step]
            # Retain As Published: a route with `retain: true` must see the publisher's flag.
            codes = await conn.subscribe(batch, retain_as_published=True)
            if len(codes) != len(batch):
                raise ConnectionFailed("SUBACK does not answer every filter")
            refused += [
                f"{topic} ({reason_name(code)})"
                for (topic, _), code in zip(batch, codes, strict=True)
                if code >= 0x80
            ]
        if refused:
            raise ConnectionFailed(f"subscription refused: {', '.join(refused)}")
        self.subscribed = True
        self._log.info("source.subscribed", filters=[topic for topic, _ in self.subscriptions])

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

    async def unsubscribe(self) -> None:
        """Stop taking new messages; what the broker already queued for us still comes."""
        conn = self._conn
        self.subscribed = False
        if conn is None or not conn.is_open:
            return
        topics = [topic for topic, _ in self.subscriptions]
        try:
            for start in range(0, len(topics), self.per_subscribe):
                await conn.unsubscribe(topics[start : start + self.per_subscribe], timeout=5.0)
        except ConnectionFailed as exc:
            self._log.warning("source.unsubscribe_failed", error=str(exc))

    async def close(self, session_expiry: int | None) -> None:
        self._stopping = True
        conn = self._conn
        if conn is not None:
            await conn.disconnect(session_expiry=session_expiry)


class Source(Service):
    def __init__(self, links: list[SourceLink], flow: Flow) -> None:
        super().__init__()
        self.links = links
        self._unwatch = flow.on_space(self._wake_all)

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

    @property
    def last_received(self) -> float:
        return max(link.last_received for link in self.links)

    async def unsubscribe(self) -> None:
        for link in self.links:
            link.stop_taking()
        await asyncio.gather(*(link.unsubscribe() for link in self.links))

    def stop_reading(self) -> None:
        for link in self.links:
            link.stop_reading()

    @property
    def has_unread(self) -> bool:
        return any(link.has_unread for link in self.links)

    async def close(self, session_expiry: int | None) -> None:
        self._unwatch()
        await asyncio.gather(*(link.close(session_expiry) for link in self.links))
