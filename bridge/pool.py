"""Target connections: each has an in-flight window, a queue, and reconnects on loss.

A topic always goes to the same connection (CRC32 of the topic), and a connection
publishes in submission order, so order per source topic holds with several
connections. Messages in flight when a connection drops were never acknowledged at
the source; they are republished, in order, after it reconnects.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections import deque
from collections.abc import Callable

import structlog

from bridge import mqtt_codec as codec
from bridge.errors import ConnectionFailed
from bridge.message import Envelope
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.mqtt_codec import Publish
from bridge.service import Backoff, Service

# Outcome of one envelope, reported to the pipeline.
DELIVERED = 0
EXPIRED = -1
POISON = -2
# Any positive outcome is the target's rejecting reason code (>= 0x80).

# A message alone in flight this many times when the target dropped the connection is
# refused by the target in the only way it has left: dead-letter it.
POISON_DROPS = 3

OnDone = Callable[[Envelope, int], None]


class TargetLink:
    def __init__(
        self,
        index: int,
        endpoint: Endpoint,
        options: SessionOptions,
        window: int,
        connect_timeout: float,
        on_done: OnDone,
        on_state: Callable[[int, bool], None],
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.options = options
        self.max_window = window
        self.window = window
        self.connect_timeout = connect_timeout
        self.queue: deque[Envelope] = deque()
        self.inflight: dict[int, Envelope] = {}
        self.conn: MqttConnection | None = None
        self.reconnects = 0
        self._on_done = on_done
        self._on_state = on_state
        self._writable = True
        self._closing = False
        # After a connection drop with messages in flight, publish one at a time until a
        # PUBACK arrives: that isolates a message the target answers by disconnecting
        # (IoT Core on an unauthorized publish; Mosquitto 2.0 after PUBACK 0x87).
        self._probing = False
        self._log = structlog.get_logger().bind(side="target", connection=index)

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def submit(self, env: Envelope) -> None:
        self.queue.append(env)
        if self.conn is not None and self._writable and len(self.inflight) < self.window:
            self._pump()

    def _pump(self) -> None:
        conn = self.conn
        if conn is None:
            return
        queue = self.queue
        inflight = self.inflight
        window = self.window
        on_done = self._on_done
        if self._probing:
            window = 1
        now = asyncio.get_running_loop().time()
        while queue and len(inflight) < window and self._writable:
            env = queue.popleft()
            if env.drops >= POISON_DROPS:
                on_done(env, POISON)
                continue
            props = env.properties
            if env.expires_at is not None:
                remaining = math.ceil(env.expires_at - now)
                if remaining <= 0:
                    on_done(env, EXPIRED)
                    continue
                props = dict(props or {})
                props[codec.MESSAGE_EXPIRY] = remaining
            packet_id = conn.publish(env.topic, env.payload, env.qos, env.retain, props)
            if packet_id:
                inflight[packet_id] = env
            else:
                # QoS 0 has no acknowledgement: handing it to the socket is all there is.
                on_done(env, DELIVERED)

    # ---- mqtt.Listener -------------------------------------------------------------

    def on_message(self, conn: MqttConnection, msg: Publish) -> bool:
        self._log.warning("target.unexpected_publish", topic=msg.topic)
        if msg.qos:
            conn.puback(msg.packet_id)
        return True

    def on_puback(self, conn: MqttConnection, packet_id: int, reason_code: int) -> None:
        env = self.inflight.pop(packet_id, None)
        if env is None or conn is not self.conn:
            return
        self._probing = False
        self._on_done(env, DELIVERED if reason_code < 0x80 else reason_code)
        self._pump()

    def on_writable(self, conn: MqttConnection, writable: bool) -> None:
        self._writable = writable
        if writable and conn is self.conn:
            self._pump()

    def on_connection_lost(self, conn: MqttConnection, exc: BaseException | None) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self._on_state(self.index, False)
        if self.inflight:
            if self._probing and len(self.inflight) == 1:
                next(iter(self.inflight.values())).drops += 1
            self._probing = True
        # In-flight messages go back to the head of the queue in their original order.
        self.queue.extendleft(reversed(self.inflight.values()))
        self.inflight.clear()
        self._log.warning(
            "target.disconnected", reason=str(exc) if exc else "closed", requeued=len(self.queue)
        )

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            conn = MqttConnection(self.options, self)
            try:
                await conn.connect(self.endpoint, self.connect_timeout)
            except ConnectionFailed as exc:
                delay = backoff.next_delay()
                self._log.warning("target.connect_failed", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.conn = conn
            self._writable = True
            self.window = min(self.max_window, conn.server_receive_maximum)
            self._on_state(self.index, True)
            self._log.info(
                "target.connected",
                endpoint=str(self.endpoint),
                client_id=self.options.client_id,
                window=self.window,
                pending=len(self.queue),
            )
            self._pump()
            await conn.wait_closed()
            if self._closing:
                return
            self.reconnects += 1
            await asyncio.sleep(backoff.next_delay())

    async def close(self) -> None:
        self._closing = True
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect()


class TargetPool(Service):
    """All target connections of one worker."""

    def __init__(self, links: list[TargetLink]) -> None:
        super().__init__()
        self.links = links

    async def start(self) -> None:
        for link in self.links:
            self.spawn(link.run(), name=f"target-{link.index}")

    def submit(self, env: Envelope) -> None:
        links = self.links
        if len(links) == 1:
            links[0].submit(env)
        else:
            links[zlib.crc32(env.topic) % len(links)].submit(env)

    @property
    def connected(self) -> bool:
        return all(link.connected for link in self.links)

    @property
    def outstanding(self) -> int:
        return sum(len(link.queue) + len(link.inflight) for link in self.links)

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))
