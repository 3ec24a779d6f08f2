"""The source side: one persistent session that consumes every route's subscription."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from bridge.errors import ConnectionFailed
from bridge.flow import AckQueue, Flow
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.mqtt_codec import Publish, reason_name
from bridge.service import Backoff, Service
from bridge.stats import Stats

Handler = Callable[[AckQueue, Publish], bool]


class Source(Service):
    """Connects with a stable client id and clean start off, so a restarted worker
    resumes its session and gets back what it had not acknowledged."""

    def __init__(
        self,
        endpoint: Endpoint,
        options: SessionOptions,
        subscriptions: list[tuple[str, int]],
        flow: Flow,
        handler: Handler,
        connect_timeout: float,
        stats: Stats,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.options = options
        self.subscriptions = subscriptions
        self.flow = flow
        self.subscribed = False
        self.reconnects = 0
        self.last_received = 0.0
        self._handler = handler
        self._stats = stats
        self._connect_timeout = connect_timeout
        self._conn: MqttConnection | None = None
        self._acks: AckQueue | None = None
        self._leaving = False
        self._log = structlog.get_logger().bind(side="source")
        self._unwatch = flow.on_space(self._on_space)

    async def start(self) -> None:
        self.spawn(self.run(), name="source")

    async def run(self) -> None:
        backoff = Backoff()
        while not self._leaving:
            conn = MqttConnection(self.options, self)
            self._conn, self._acks = conn, AckQueue(self.flow, conn, self._stats)
            try:
                await conn.connect(self.endpoint, self._connect_timeout)
                self._log.info(
                    "source.connected",
                    endpoint=str(self.endpoint),
                    client_id=self.options.client_id,
                    session_present=conn.session_present,
                )
                await self._subscribe(conn)
            except ConnectionFailed as exc:
                conn.abort()
                delay = backoff.next_delay()
                self._log.warning("source.connect_failed", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            await conn.wait_closed()
            if self._leaving:
                return
            self.reconnects += 1
            await asyncio.sleep(backoff.next_delay())

    async def _subscribe(self, conn: MqttConnection) -> None:
        # Retain As Published: a route with `retain: true` must see the publisher's flag.
        codes = await conn.subscribe(self.subscriptions, retain_as_published=True)
        refused = [
            f"{topic} ({reason_name(code)})"
            for (topic, _), code in zip(self.subscriptions, codes, strict=False)
            if code >= 0x80
        ]
        if refused or len(codes) != len(self.subscriptions):
            raise ConnectionFailed(f"subscription refused: {', '.join(refused) or 'bad SUBACK'}")
        self.subscribed = True
        self._log.info("source.subscribed", filters=[topic for topic, _ in self.subscriptions])

    def _on_space(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    # ---- mqtt.Listener -------------------------------------------------------------

    def on_message(self, conn: MqttConnection, msg: Publish) -> bool:
        acks = self._acks
        if conn is not self._conn or acks is None:
            return True
        self.last_received = asyncio.get_running_loop().time()
        return self._handler(acks, msg)

    def on_puback(self, conn: MqttConnection, packet_id: int, reason_code: int) -> None:
        """The source side never publishes."""

    def on_writable(self, conn: MqttConnection, writable: bool) -> None:
        """Only PUBACKs go out on this side; they are bounded by the flow."""

    def on_connection_lost(self, conn: MqttConnection, exc: BaseException | None) -> None:
        if conn is not self._conn:
            return
        if self._acks is not None:
            self._acks.detach()
        was_subscribed, self.subscribed = self.subscribed, False
        if was_subscribed and not self._leaving:
            self._log.warning("source.disconnected", reason=str(exc) if exc else "closed")

    # ---- graceful leave ------------------------------------------------------------

    async def unsubscribe(self) -> None:
        """Stop taking new messages; what the broker already queued for us still comes."""
        conn = self._conn
        self.subscribed = False
        if conn is None or not conn.is_open:
            return
        try:
            await conn.unsubscribe([topic for topic, _ in self.subscriptions], timeout=5.0)
        except ConnectionFailed as exc:
            self._log.warning("source.unsubscribe_failed", error=str(exc))

    async def close(self, session_expiry: int | None) -> None:
        self._leaving = True
        self._unwatch()
        conn = self._conn
        if conn is not None:
            await conn.disconnect(session_expiry=session_expiry)
