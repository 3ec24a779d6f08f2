"""Target connections: each has a paced, windowed queue and reconnects on loss.

A topic always goes to the same connection (CRC32 of the topic), and a connection
publishes in submission order, so order per source topic holds with several
connections. Messages in flight when a connection drops were never acknowledged at
the source; they are republished, in order, after it reconnects.
"""

from __future__ import annotations

import asyncio
import math
import struct
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from bridge import mqtt_codec as codec
from bridge.errors import ConnectionFailed, PacketTooLarge
from bridge.message import Envelope
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.mqtt_codec import SESSION_TAKEN_OVER, TAKEOVER_HINT, Publish
from bridge.pacing import Throttle, TokenBucket
from bridge.service import Backoff, ConnectPacer, Service

# Outcome of one envelope, reported to the pipeline.
DELIVERED = 0
EXPIRED = -1
POISON = -2
TOO_LARGE = -3  # over the Maximum Packet Size the target announced
UNENCODABLE = -4  # cannot be an MQTT packet at all (e.g. a topic over 65535 bytes)
# Any positive outcome is the target's rejecting reason code (>= 0x80).

# A message alone in flight this many times when the target dropped the connection is
# refused by the target in the only way it has left: dead-letter it.
POISON_DROPS = 3

QUOTA_EXCEEDED = 0x97
RECEIVE_MAXIMUM_EXCEEDED = 0x93
# Disconnects that can be about the message just sent. Throttling (0x97), takeover
# (0x8E), shutdown (0x8B) and the like are the server's business, not the message's.
MESSAGE_FAULTS = frozenset({None, 0x80, 0x81, 0x82, 0x83, 0x87, 0x90, 0x95, 0x99, 0x9A, 0x9B})
# A drop this long after the probe was sent is not its answer.
PROBE_ANSWER_WITHIN = 5.0

OnDone = Callable[[Envelope, int], None]


@dataclass(frozen=True, slots=True)
class Pacing:
    publish_rate: float | None = None  # messages/s per connection
    bytes_rate: float | None = None  # bytes/s per connection
    burst: float = 1.0  # seconds' worth of tokens a bucket holds
    connect_interval: float = 0.0  # minimum seconds between CONNECTs of one client id


class TargetLink:
    def __init__(
        self,
        index: int,
        endpoint: Endpoint,
        options: SessionOptions,
        window: int,
        connect_timeout: float,
        pacing: Pacing,
        on_done: OnDone,
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.options = options
        self.max_window = window
        self.window = window
        self.connect_timeout = connect_timeout
        self.pacing = pacing
        self.queue: deque[Envelope] = deque()
        self.inflight: dict[int, Envelope] = {}
        self.conn: MqttConnection | None = None
        self.reconnects = 0
        self.published = 0
        self.throttled: Counter[str] = Counter()
        self.disconnects: Counter[str] = Counter()
        self._on_done = on_done
        self._writable = True
        self._closing = False
        # After a connection drop with messages in flight, publish one at a time until a
        # PUBACK arrives: that isolates a message the target answers by disconnecting
        # (IoT Core on an unauthorized publish; Mosquitto 2.0 after PUBACK 0x87).
        self._probing = False
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._throttle = Throttle()
        self._messages = (
            TokenBucket(pacing.publish_rate, pacing.burst, now) if pacing.publish_rate else None
        )
        self._bytes = (
            TokenBucket(pacing.bytes_rate, pacing.burst, now) if pacing.bytes_rate else None
        )
        self._timer: asyncio.TimerHandle | None = None
        self._pacer = ConnectPacer(pacing.connect_interval)
        # The window before throttling: ours, capped by the server's Receive Maximum.
        self._window_cap = window
        self._seq = 0
        self._log = structlog.get_logger().bind(side="target", connection=index)

    @property
    def connected(self) -> bool:
        return self.conn is not None

    @property
    def rate_limit(self) -> float:
        """The publish rate currently allowed (0 when unpaced)."""
        return self._messages.rate if self._messages is not None else 0.0

    def submit(self, env: Envelope) -> None:
        env.seq = self._seq
        self._seq += 1
        self.queue.append(env)
        if len(self.queue) == 1:
            # Publish at once: a QoS 0 message then finishes within the read that brought
            # it, so its flow slot is free for the next one (deferring the pump to the
            # next loop iteration made one big read overflow the bound: measured).
            self._pump()

    def _requeue(self, envs: list[Envelope]) -> None:
        """Put envelopes back where they were: submission order holds through retries."""
        self.queue = deque(sorted([*envs, *self.queue], key=lambda e: e.seq))

    def _pump(self) -> None:
        conn = self.conn
        if conn is None or self._timer is not None:
            return
        queue = self.queue
        inflight = self.inflight
        window = 1 if self._probing else self.window
        on_done = self._on_done
        now = self._loop.time()
        messages, size_bucket = self._messages, self._bytes
        while queue and len(inflight) < window and self._writable:
            env = queue[0]
            if env.drops >= POISON_DROPS:
                queue.popleft()
                on_done(env, POISON)
                continue
            wait = messages.delay(1, now) if messages is not None else 0.0
            if not wait and size_bucket is not None:
                wait = size_bucket.delay(len(env.payload), now)
                if wait and messages is not None:
                    messages.tokens += 1  # give back: nothing was sent
            if wait:
                self._timer = self._loop.call_later(wait, self._resume)
                return
            queue.popleft()
            props = env.properties
            if env.expires_at is not None:
                # (t + n) - t can exceed n by one ulp: without the epsilon, 3600 becomes 3601.
                remaining = math.ceil(env.expires_at - now - 1e-6)
                if remaining <= 0:
                    on_done(env, EXPIRED)
                    continue
                # An expiry only comes with a properties dict, never the encoded marker.
                props = dict(props) if isinstance(props, dict) else {}
                props[codec.MESSAGE_EXPIRY] = remaining
            try:
                packet_id = conn.publish(env.topic, env.payload, env.qos, env.retain, props)
            except PacketTooLarge:
                on_done(env, TOO_LARGE)
                continue
            except (struct.error, ValueError, OverflowError):
                on_done(env, UNENCODABLE)
                continue
            env.sent_at = now
            if packet_id:
                inflight[packet_id] = env
            else:
                # QoS 0 has no acknowledgement: handing it to the socket is all there is.
                self.published += 1
                on_done(env, DELIVERED)

    def _resume(self) -> None:
        self._timer = None
        self._pump()

    def _use_factor(self, factor: float) -> None:
        """Run at ``factor`` of full speed: the publish rate when paced, else the window."""
        if self._messages is not None and self.pacing.publish_rate:
            self._messages.set_rate(self.pacing.publish_rate * factor, self.pacing.burst)
        else:
            self.window = max(1, math.ceil(self._window_cap * factor))

    def _apply_throttle(self, now: float) -> None:
        self._use_factor(self._throttle.hit(now))

    def _recover(self, now: float) -> None:
        if self._throttle.events:
            self._use_factor(self._throttle.factor(now))

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
        now = self._loop.time()
        if reason_code == QUOTA_EXCEEDED:
            # Not the message's fault: slow this connection down and send it again.
            self.throttled["quota_exceeded"] += 1
            self._apply_throttle(now)
            self._requeue([env])
            self._log.warning(
                "target.throttled",
                reason="quota exceeded (0x97)",
                rate=self.rate_limit,
                window=self.window,
            )
        else:
            if reason_code < 0x80:
                self.published += 1
            self._recover(now)
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = conn.disconnect_reason
        if reason is not None:
            self.disconnects[codec.reason_name(reason).replace(" ", "_")] += 1
        if reason == SESSION_TAKEN_OVER:
            self._log.error(
                "target.session_taken_over",
                client_id=self.options.client_id,
                hint=TAKEOVER_HINT,
            )
        elif reason == RECEIVE_MAXIMUM_EXCEEDED:
            self.max_window = max(1, self.window // 2)
            self.window = self._window_cap = self.max_window
            self._log.warning("target.window_shrunk", window=self.window)
        elif reason == QUOTA_EXCEEDED:
            self.throttled["disconnect_quota_exceeded"] += 1
            self._apply_throttle(self._loop.time())
        if self.inflight:
            if self._probing and len(self.inflight) == 1 and reason in MESSAGE_FAULTS:
                probe = next(iter(self.inflight.values()))
                if (
                    self._loop.time() - probe.sent_at < PROBE_ANSWER_WITHIN
                    and not conn.closed_by_us
                ):
                    probe.drops += 1
            self._probing = True
        # In-flight messages go back into the queue in their original order.
        self._requeue(list(self.inflight.values()))
        self.inflight.clear()
        if not self._closing:
            self._log.warning(
                "target.disconnected",
                reason=str(exc) if exc else "closed",
                requeued=len(self.queue),
            )

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            await self._pacer.wait()
            conn = MqttConnection(self.options, self)
            try:
                await conn.connect(self.endpoint, self.connect_timeout)
            except ConnectionFailed as exc:
                delay = backoff.next_delay()
                self._log.warning("target.connect_failed", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            self.conn = conn
            self._writable = True
            self.window = self._window_cap = min(self.max_window, conn.server_receive_maximum)
            self._recover(self._loop.time())  # a throttle outlives the connection
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
            if conn.disconnect_reason != SESSION_TAKEN_OVER:
                backoff.reset()  # a takeover keeps growing the delay: two owners must not ping-pong
            await asyncio.sleep(backoff.next_delay())

    async def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))
