"""One connection's life, written once for both sides: pace the CONNECT, connect, hand
the connection to its owner, wait until it closes, back off, connect again.

A connection never reconnects itself (``mqtt.py``); a link does, the way Benthos'
``AsyncReader`` owns reconnects for its inputs. What a side does with a fresh
connection (subscribe, resume publishing) and with a lost one (requeue, detach the
acknowledgements) are its two hooks. The connection comes from an injected factory, so
a link runs in-process against a fake connection in the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from bridge.errors import ConnectionFailed, ProtocolViolation
from bridge.failover import FAILBACK, Failover, Move, log_move
from bridge.mqtt import Endpoint, Listener, SessionOptions
from bridge.mqtt_codec import SESSION_TAKEN_OVER, Properties, Publish

# Logged with every takeover: the usual cause at 3 a.m.
TAKEOVER_HINT = "another connection uses this client id: do two workers share an instance_id?"
# A connection that lasted less than this, and did no work (no SUBACK, no PUBACK), did
# not prove the broker healthy: the backoff keeps growing (a broker that accepts and kicks
# at once caused a reconnect storm). One that did work resets it: a target that drops us
# after each refused publish must not slow the rest of the stream down.
STABLE_AFTER = 10.0
# This many such short connections in a row, closed without a reason, is most likely
# another client taking our id over (Mosquitto < 2.0.15 and 3.1.1 brokers send no 0x8E).
SHORT_LIVED_STREAK = 3


class Connection(Protocol):
    """What a link uses of one MQTT connection (``mqtt.MqttConnection`` in production)."""

    session_present: bool
    disconnect_reason: int | None
    disconnect_detail: str
    ack_reason: str  # the last PUBACK's reason string
    max_qos: int  # from the server's CONNACK (MQTT 5), else 1
    protocol_error: str | None  # why we hung up on a peer that broke the protocol

    @property
    def is_open(self) -> bool: ...
    @property
    def closed_by_us(self) -> bool: ...
    @property
    def server_receive_maximum(self) -> int: ...
    @property
    def has_unread(self) -> bool: ...
    @property
    def last_rx(self) -> float: ...

    async def connect(self, endpoint: Endpoint, timeout: float = 10.0) -> None: ...
    async def wait_closed(self) -> None: ...
    async def disconnect(
        self, session_expiry: int | None = None, timeout: float = 2.0, with_will: bool = False
    ) -> None: ...
    def abort(self) -> None: ...
    def publish(
        self,
        topic: bytes,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | bytes | None = None,
    ) -> int: ...
    def puback(self, packet_id: int) -> None: ...
    def flush(self) -> None:
        """Write what is queued now, in one call, instead of at the end of the iteration."""

    async def subscribe(
        self, filters: list[tuple[str, int]], retain_as_published: bool, timeout: float = 10.0
    ) -> list[int]: ...
    async def unsubscribe(self, filters: list[str], timeout: float = 10.0) -> list[int]: ...
    def resume(self) -> None: ...
    def stop_reading(self) -> None: ...


ConnectionFactory = Callable[[SessionOptions, Listener], Connection]


@dataclass(frozen=True, slots=True)
class LinkStats:
    """One connection as metrics and readiness see it (read at scrape time)."""

    index: int
    up: bool  # target: connected; source: subscribed
    reconnects: int
    published: int = 0
    window: int = 0
    rate_limit: float = 0.0  # 0: unpaced
    throttled: dict[str, int] = field(default_factory=dict)
    disconnects: dict[str, int] = field(default_factory=dict)
    sessions_lost: int = 0  # source: reconnects that found no session
    oldest: float | None = None  # source: loop time the oldest unacknowledged message came
    received: int = 0  # source: messages this connection took
    protocol_errors: dict[str, int] = field(default_factory=dict)
    problem: str | None = None  # why it is down: readiness shows it


class PubackWaiters:
    """Publishes outside a link's queues whose PUBACK someone awaits (a probe, a member
    record): the awaiting side, the answering side, and the answer when the connection
    is lost (0x80, unspecified error: not acknowledged)."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[int]] = {}

    async def wait(self, packet_id: int, timeout: float) -> bool:
        """True when ``packet_id``'s PUBACK comes within ``timeout`` with success."""
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[packet_id] = answer
        try:
            async with asyncio.timeout(timeout):
                return await answer < 0x80
        except TimeoutError:
            return False
        finally:
            self._waiting.pop(packet_id, None)

    def answer(self, packet_id: int, reason_code: int) -> None:
        answer = self._waiting.get(packet_id)
        if answer is not None and not answer.done():
            answer.set_result(reason_code)

    def lost(self) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_result(0x80)


class ConnectPacer:
    """At most one CONNECT per ``interval`` for one client id, with jitter so that many
    workers restarted at once spread their CONNECTs (AWS IoT Core: 1/s per client id)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -math.inf

    async def wait(self) -> None:
        if self.interval:
            wait = self._last + self.interval - time.monotonic()
            await asyncio.sleep(max(0.0, wait) + random.uniform(0, self.interval / 2))
        self._last = time.monotonic()


class Backoff:
    """Capped exponential backoff with full jitter (no thundering herd after an outage)."""

    def __init__(self, initial: float = 0.2, cap: float = 10.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Link:
    """Base of ``SourceLink`` and ``TargetLink``: the reconnect loop and what it counts.

    Subclasses set ``side`` and implement ``_on_connect`` (awaited after a successful
    CONNACK; raising ConnectionFailed counts as a failed connect) and the
    ``mqtt.Listener`` callbacks. Which endpoint to dial is the ``failover`` policy's
    choice (shared by the links of one side); without one, ``endpoint`` is the only one.
    """

    side = "link"

    def __init__(
        self,
        index: int,
        endpoint: Endpoint,
        options: SessionOptions,
        connect_timeout: float,
        connect_interval: float,
        factory: ConnectionFactory,
        failover: Failover | None = None,
        connect_tries: int | None = None,
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.options = options
        self.connect_timeout = connect_timeout
        self.reconnects = 0
        # Peers that broke the protocol, by what they did (metric label).
        self.protocol_errors: Counter[str] = Counter()
        self.problem: str | None = None  # the last connect failure, while down
        # None: retry for ever (a worker waits for its broker). A number: give up after
        # that many failed connects in a row (a one-shot tool such as replay).
        self.connect_tries = connect_tries
        self.gave_up: ConnectionFailed | None = None
        self.failed = asyncio.Event()  # set when it gave up
        self._factory = factory
        self._pacer = ConnectPacer(connect_interval)
        self._stopping = False
        self._useful = False  # the current connection did work (see STABLE_AFTER)
        self._log = structlog.get_logger().bind(side=self.side, connection=index)
        self.failover = failover or Failover(self.side, [endpoint])
        self.failover.on_move(self._moved)
        self._dialed = 0  # the failover index of the endpoint of the current connection
        self._live: Connection | None = None
        self._leaving: set[asyncio.Task[None]] = set()
        self._redial = asyncio.Event()

    async def run(self) -> None:
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        short_lived = 0
        failures = 0
        while not self._stopping:
            await self._pacer.wait()
            self._dialed, self.endpoint = self.failover.dial()
            conn = self._factory(self.options, self)
            self._useful = False
            started = loop.time()
            reached = False  # the broker answered CONNACK: it is up, whatever comes next
            try:
                self._on_new(conn)
                await conn.connect(self.endpoint, self.connect_timeout)
                self.failover.connected(self._dialed)
                reached = True
                await self._on_connect(conn)
            except ConnectionFailed as exc:
                conn.abort()
                self.problem = str(exc)
                if isinstance(exc, ProtocolViolation):
                    self.protocol_errors[exc.reason] += 1
                failures += 1
                if self.connect_tries is not None and failures >= self.connect_tries:
                    self._give_up(exc, failures)
                    return
                delay = backoff.next_delay()
                if reached:
                    self.failover.lost(self._dialed)
                elif move := self.failover.failed(self._dialed, started, loop.time()):
                    log_move(self._log, move)
                if self.failover.active != self._dialed:
                    backoff.reset()  # the side moved: a new endpoint starts with a short delay
                    delay = backoff.next_delay()
                else:
                    delay = self.failover.retry_delay(delay, loop.time())
                self._log.warning(
                    f"{self.side}.connect_failed", error=str(exc), retry_in=round(delay, 2)
                )
                await self._sleep(delay)
                continue
            failures = 0
            self.problem = None
            up_since = loop.time()
            self._live = conn
            try:
                await conn.wait_closed()
            finally:
                self._live = None
                self.failover.lost(self._dialed)
            if conn.protocol_error is not None:
                self.protocol_errors[conn.protocol_error] += 1
            stable = self._useful or loop.time() - up_since >= STABLE_AFTER
            taken_over = conn.disconnect_reason == SESSION_TAKEN_OVER
            if taken_over:
                self._log.error(
                    f"{self.side}.session_taken_over",
                    client_id=self.options.client_id,
                    hint=TAKEOVER_HINT,
                )
            if self._stopping:
                return
            self.reconnects += 1
            lasted = loop.time() - up_since >= STABLE_AFTER
            short_lived = 0 if lasted or conn.disconnect_reason is not None else short_lived + 1
            if short_lived == SHORT_LIVED_STREAK:
                self._log.error(
                    f"{self.side}.closed_after_connack",
                    client_id=self.options.client_id,
                    times=short_lived,
                    hint=TAKEOVER_HINT,
                )
            if stable and not taken_over:
                # A takeover keeps growing the delay: two owners must not ping-pong.
                backoff.reset()
            await self._sleep(backoff.next_delay())

    async def _sleep(self, delay: float) -> None:
        """Back off, unless the side moves meanwhile: then dial the new endpoint at once."""
        self._redial.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._redial.wait()

    def _moved(self, move: Move) -> None:
        self._redial.set()
        conn = self._live
        if move.reason != FAILBACK or conn is None or self._stopping:
            return  # a failover never drops a live connection: it is healthy
        if self._dialed == self.failover.active:
            return
        # Back to the primary, proven by probes: leave gracefully; what was in flight is
        # republished on the next connection.
        task = asyncio.get_running_loop().create_task(conn.disconnect())
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    def _give_up(self, exc: ConnectionFailed, tries: int) -> None:
        self.gave_up = ConnectionFailed(f"{exc} (gave up after {tries} tries)")
        self._log.error(f"{self.side}.gave_up", error=str(exc), tries=tries)
        self.failed.set()

    # ---- mqtt.Listener: what every side answers --------------------------------------

    def on_message(self, conn: Connection, msg: Publish) -> bool:
        raise NotImplementedError

    def on_puback(self, conn: Connection, packet_id: int, reason_code: int) -> None:
        raise NotImplementedError

    def on_writable(self, conn: Connection, writable: bool) -> None:
        raise NotImplementedError

    def on_connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        raise NotImplementedError

    # ---- hooks ---------------------------------------------------------------------

    def _did_work(self) -> None:
        """The current connection carried real work: the broker is not just kicking us."""
        self._useful = True

    def _on_new(self, conn: Connection) -> None:
        """A connection is about to connect (the source takes messages from CONNACK on)."""

    async def _on_connect(self, conn: Connection) -> None:
        raise NotImplementedError
