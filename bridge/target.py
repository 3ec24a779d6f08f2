"""The target side: a named contract, and the pool of paced MQTT connections behind it.

``Target`` is what the pipeline writes to (Benthos' output contract): enter to connect,
``submit`` an envelope, and its ``Outcome`` comes back through the ``on_done`` callback
given at construction — the ack carries the write's result. ``ready`` and
``connections()`` are what readiness and metrics read.

``TargetPool`` is the MQTT implementation. A topic is pinned to one connection while
it has messages there, and an idle topic goes to the least busy one (``balance.py``);
a connection publishes in submission order, so order per topic holds with several
connections. Messages in flight when a connection drops were never acknowledged at the
source; they are republished, in order, after it reconnects.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from bridge import mqtt_codec as codec
from bridge.acks import INTERNAL
from bridge.balance import Balancer
from bridge.errors import ConnectionFailed, PacketTooLarge
from bridge.failover import Failover
from bridge.link import Connection, ConnectionFactory, Link, LinkStats, PubackWaiters
from bridge.message import Envelope
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.mqtt_codec import Publish
from bridge.outcome import DELIVERED, EXPIRED, POISON, TOO_LARGE, UNENCODABLE, Outcome
from bridge.pacing import Pacer, Pacing, Ticker, tick_for
from bridge.policy import (
    POISON_DROPS,
    on_connection_lost,
    puback_outcome,
    qos_refusal,
    remaining_expiry,
)
from bridge.service import Service

OnDone = Callable[[Envelope, Outcome], None]


class Target(Protocol):
    """Where envelopes go. Every submitted envelope gets exactly one outcome."""

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc_info: Any) -> bool | None: ...

    def submit(self, env: Envelope) -> None:
        """Queue ``env``; never blocks (the flow bounds what can be queued)."""
        ...

    @property
    def ready(self) -> bool:
        """Every connection is up."""
        ...

    def connections(self) -> list[LinkStats]: ...

    async def probe(
        self, topic: bytes, properties: codec.Properties | None, timeout: float
    ) -> bool:
        """Publish one empty QoS 1 message on a connection that is up, outside the
        queues; True when the target acknowledged it with success (the path is proven)."""

    def repace(self, pacing: Pacing) -> None:
        """New rates for every connection, from now on (a live reload); nothing is resent."""
        ...

    async def close(self) -> None:
        """Disconnect; envelopes still queued get no outcome (their sources redeliver)."""
        ...


class TargetLink(Link):
    """One target connection: a paced, windowed queue that survives reconnects."""

    side = "target"

    def __init__(
        self,
        index: int,
        endpoint: Endpoint,
        options: SessionOptions,
        window: int,
        connect_timeout: float,
        pacing: Pacing,
        on_done: OnDone,
        factory: ConnectionFactory = MqttConnection,
        canary: tuple[bytes, codec.Properties | None] | None = None,
        failover: Failover | None = None,
        needed_qos: int = 1,
        connect_tries: int | None = None,
        ticker: Ticker | None = None,
    ) -> None:
        super().__init__(
            index,
            endpoint,
            options,
            connect_timeout,
            pacing.connect_interval,
            factory,
            failover,
            connect_tries,
        )
        self.needed_qos = needed_qos
        # (topic, properties) of the canary publish that proves a connection before a
        # suspect message is blamed for breaking it (policy.on_connection_lost).
        self._canary = canary
        self._canary_pid: int | None = None
        self._need_canary = False
        self._proven = False
        self._loop = asyncio.get_running_loop()
        self.pacer = Pacer(pacing, window, self._loop.time())
        self.queue: deque[Envelope] = deque()
        self.inflight: dict[int, Envelope] = {}
        self.conn: Connection | None = None
        self.published = 0
        self.throttled: Counter[str] = Counter()
        self.disconnects: Counter[str] = Counter()
        self._on_done = on_done
        self._writable = True
        # After a drop with messages in flight, publish one at a time until a PUBACK
        # arrives (policy.on_connection_lost says why).
        self._probing = False
        # Waiting for tokens: the pool's ticker resumes every waiting connection at once.
        self._ticker = ticker or Ticker(tick_for(pacing))
        self._waiting = False
        self._confirming = False  # a pacer.written() is scheduled
        self._seq = 0
        self._probes = PubackWaiters()

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def stats(self) -> LinkStats:
        return LinkStats(
            self.index,
            self.connected,
            self.reconnects,
            self.published,
            self.pacer.window,
            self.pacer.rate_limit,
            dict(self.throttled),
            dict(self.disconnects),
            protocol_errors=dict(self.protocol_errors),
            problem=self.problem,
        )

    def submit(self, env: Envelope) -> None:
        env.seq = self._seq
        self._seq += 1
        self.queue.append(env)
        if len(self.queue) == 1:
            # Publish at once: a QoS 0 message then finishes within the read that brought
            # it, so its flow slot is free for the next one (deferring the pump to the
            # next loop iteration made one big read overflow the bound: measured).
            self._pump()

    def also_on_done(self, first: Callable[[Envelope], None]) -> None:
        """Call ``first(env)`` before every outcome (the pool's balancer counts them)."""
        then = self._on_done

        def done(env: Envelope, outcome: Outcome) -> None:
            first(env)
            then(env, outcome)

        self._on_done = done

    def _requeue(self, envs: list[Envelope]) -> None:
        """Put envelopes back where they were: submission order holds through retries."""
        self.queue = deque(sorted([*envs, *self.queue], key=lambda e: e.seq))

    def _pump(self) -> None:
        conn = self.conn
        if conn is None or self._waiting:
            return
        queue = self.queue
        if self._need_canary and not self._proven:
            # A message already found guilty needs no proof of the connection.
            while queue and queue[0].drops >= POISON_DROPS:
                self._on_done(queue.popleft(), POISON)
            self._send_canary(conn)
            return
        inflight = self.inflight
        pacer = self.pacer
        window = 1 if self._probing else pacer.window
        now = self._loop.time()
        granted = False
        while queue and len(inflight) < window and self._writable:
            env = queue[0]
            if env.drops >= POISON_DROPS:
                queue.popleft()
                self._on_done(env, POISON)
                continue
            if pacer.paced:
                wait = pacer.delay(len(env.payload), now)
                if wait:
                    self._waiting = True
                    self._ticker.after(wait, self._resume)
                    break
                granted = True
            queue.popleft()
            self._send(conn, env, now)
        if granted and not self._confirming:
            # The pacer counted these sends at `now`; the connection writes them when
            # this loop iteration's work is done (with the rest of what it queued: one
            # write, not one per message). Tell the pacer when that was, as its cap
            # counts on-the-wire times (a stall in between once bunched 119 sends into
            # one second at rate 100).
            self._confirming = True
            self._loop.call_soon(self._written)

    def _send(self, conn: Connection, env: Envelope, now: float) -> None:
        props = env.properties
        if env.expires_at is not None:
            remaining = remaining_expiry(env.expires_at, now)
            if remaining <= 0:
                self._on_done(env, EXPIRED)
                return
            # An expiry only comes with a properties dict, never the encoded marker.
            props = dict(props) if isinstance(props, dict) else {}
            props[codec.MESSAGE_EXPIRY] = remaining
        try:
            packet_id = conn.publish(env.topic, env.payload, env.qos, env.retain, props)
        except PacketTooLarge:
            self._on_done(env, TOO_LARGE)
            return
        except (struct.error, ValueError, OverflowError):
            self._on_done(env, UNENCODABLE)
            return
        env.sent_at = now
        if packet_id:
            self.inflight[packet_id] = env
        else:
            # QoS 0 has no acknowledgement: handing it to the socket is all there is.
            self.published += 1
            self._on_done(env, DELIVERED)

    def _send_canary(self, conn: Connection) -> None:
        if self._canary_pid is not None or self._canary is None:
            return
        topic, props = self._canary
        self._canary_pid = conn.publish(topic, b"", 1, False, props)

    def _written(self) -> None:
        # Runs after the connection's own flush (scheduled by the first publish); a
        # send granted since then is written now, so that every grant is on the wire.
        self._confirming = False
        if self.conn is not None:
            self.conn.flush()
        self.pacer.written(self._loop.time())

    def _resume(self) -> None:
        self._waiting = False
        self._pump()

    def _stop_waiting(self) -> None:
        if self._waiting:
            self._ticker.cancel(self._resume)
            self._waiting = False

    def repace(self, pacing: Pacing) -> None:
        self._ticker.retune(tick_for(pacing))
        self.pacer.repace(pacing, self._loop.time())
        # A wait computed at the old rate may now be too long: compute it again.
        self._stop_waiting()
        self._pump()

    # ---- link hooks ----------------------------------------------------------------

    async def _on_connect(self, conn: Connection) -> None:
        refusal = qos_refusal(conn.max_qos, self.needed_qos)
        if refusal is not None:
            # Not a connection to publish on: the link backs off and tries again (the
            # target may be reconfigured); readiness and the log say why.
            await conn.disconnect()
            raise ConnectionFailed(refusal)
        self.conn = conn
        self._writable = True
        self._proven = False
        self._canary_pid = None
        self.pacer.connected(conn.server_receive_maximum, self._loop.time())
        self._log.info(
            "target.connected",
            endpoint=str(self.endpoint),
            client_id=self.options.client_id,
            window=self.pacer.window,
            pending=len(self.queue),
        )
        self._pump()

    # ---- mqtt.Listener -------------------------------------------------------------

    def on_message(self, conn: Connection, msg: Publish) -> bool:
        self._log.warning("target.unexpected_publish", topic=msg.topic)
        if msg.qos:
            conn.puback(msg.packet_id)
        return True

    def on_puback(self, conn: Connection, packet_id: int, reason_code: int) -> None:
        self._useful = True  # (Link._did_work, inlined: this is the hot path)
        env = self.inflight.pop(packet_id, None)
        if env is None or conn is not self.conn:
            if packet_id == self._canary_pid and conn is self.conn:
                # Answered at all: the connection carries publishes. Now the suspect.
                self._canary_pid = None
                self._proven = True
                self._pump()
                return
            self._probes.answer(packet_id, reason_code)
            return
        self._probing = False
        now = self._loop.time()
        outcome = puback_outcome(reason_code, conn.ack_reason if reason_code >= 0x80 else "")
        if outcome is None:
            self.throttled["quota_exceeded"] += 1
            self.pacer.throttled(now)
            self._requeue([env])
            self._log.warning(
                "target.throttled",
                reason="quota exceeded (0x97)",
                rate=self.pacer.rate_limit,
                window=self.pacer.window,
            )
        else:
            if outcome is DELIVERED and env.route != INTERNAL:  # heartbeats are not traffic
                self.published += 1
            self.pacer.recover(now)
            self._on_done(env, outcome)
        self._pump()

    def on_writable(self, conn: Connection, writable: bool) -> None:
        self._writable = writable
        if writable and conn is self.conn:
            self._pump()

    def on_connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self._stop_waiting()
        self._probes.lost()  # unanswered: not proven
        reason = conn.disconnect_reason
        if reason is not None:
            self.disconnects[codec.reason_name(reason).replace(" ", "_")] += 1
        now = self._loop.time()
        lone = next(iter(self.inflight.values())) if len(self.inflight) == 1 else None
        response = on_connection_lost(
            reason,
            inflight=len(self.inflight),
            probing=self._probing,
            lone_age=now - lone.sent_at if lone is not None else None,
            closed_by_us=conn.closed_by_us,
            proven=self._proven or self._canary is None,
        )
        if response.shrink_window:
            self.pacer.shrink_window()
            self._log.warning("target.window_shrunk", window=self.pacer.window)
        if response.throttle:
            self.throttled["disconnect_quota_exceeded"] += 1
            self.pacer.throttled(now)
        if response.strike and lone is not None:
            lone.drops += 1
        self._probing = response.probe
        self._need_canary = response.canary and self._canary is not None
        # In-flight messages go back into the queue in their original order.
        self._requeue(list(self.inflight.values()))
        self.inflight.clear()
        if not self._stopping:
            self._log.warning(
                "target.disconnected",
                reason=str(exc) if exc else "closed",
                requeued=len(self.queue),
            )

    async def probe(
        self, topic: bytes, properties: codec.Properties | None, timeout: float
    ) -> bool:
        conn = self.conn
        if conn is None:
            return False
        try:
            packet_id = conn.publish(topic, b"", 1, False, properties)
        except (PacketTooLarge, ValueError, struct.error):
            return False
        return await self._probes.wait(packet_id, timeout)

    # ---- lifecycle -----------------------------------------------------------------

    async def close(self) -> None:
        self._stopping = True
        self._stop_waiting()
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect()


class TargetPool(Service):
    """All target connections of one worker: the MQTT ``Target``."""

    def __init__(self, links: list[TargetLink]) -> None:
        super().__init__()
        self.links = links
        self.balancer = Balancer(len(links))
        if len(links) > 1:
            for link in links:
                link.also_on_done(self._finished)

    async def start(self) -> None:
        for link in self.links:
            self.spawn(link.run(), name=f"target-{link.index}")

    def submit(self, env: Envelope) -> None:
        links = self.links
        if len(links) == 1:
            links[0].submit(env)
        else:
            links[self.balancer.assign(env.topic, env.qos)].submit(env)

    def _finished(self, env: Envelope) -> None:
        self.balancer.finished(env.topic)

    @property
    def ready(self) -> bool:
        return all(link.connected for link in self.links)

    def connections(self) -> list[LinkStats]:
        return [link.stats() for link in self.links]

    async def probe(
        self, topic: bytes, properties: codec.Properties | None, timeout: float
    ) -> bool:
        for link in self.links:
            if link.connected:
                return await link.probe(topic, properties, timeout)
        return False

    def repace(self, pacing: Pacing) -> None:
        for link in self.links:
            link.repace(pacing)

    async def wait_failed(self) -> ConnectionFailed:
        """Wait until a connection gives up (only with ``connect_tries``); its error."""
        waits = [asyncio.ensure_future(link.failed.wait()) for link in self.links]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return next(link.gave_up for link in self.links if link.gave_up is not None)

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))
