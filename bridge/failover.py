"""Failover endpoints: which broker a side dials, when it moves on, when it comes back.

``Failover`` is the policy and it is pure: the links of one side (every source or every
target connection, and the heartbeat's connection on that side) tell it how their
connects went, with the time, and ask it which endpoint to dial. It never sleeps,
connects or logs (the shape of httpcore's ``_assign_requests_to_connections``), so every
rule below is a unit test without a socket.

- **Failover.** A side moves to the next endpoint (round robin) once connects to the
  active one have failed for ``failover_after`` seconds, counted from the start of the
  first failed attempt, while none of its connections is up there. One healthy
  connection proves the endpoint; a link that cannot connect for a reason of its own
  (a client id taken over) does not move the others.
- **Failback.** On a failover endpoint, ``Failback`` probes the primary with a real
  CONNECT (a client id of its own, clean start, then DISCONNECT). The side moves back only
  after the probes have succeeded for ``failback_after`` seconds in a row; one failed probe
  starts the count again. Until then the connections on the failover endpoint stay: a
  healthy connection is never dropped for an unproven one. ``failback_after: null`` never
  moves back on its own (a restart starts on the primary).
- **DNS.** Host names are handed to the event loop as names, so they are resolved again on
  every connect: a DNS failover (Route 53 health checks) is followed without this module.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bridge.errors import ConnectionFailed
from bridge.mqtt import Endpoint, SessionOptions
from bridge.service import Service

if TYPE_CHECKING:
    from bridge.link import Connection, ConnectionFactory

FAILOVER = "failover"
FAILBACK = "failback"


@dataclass(frozen=True, slots=True)
class Move:
    side: str
    source: Endpoint
    target: Endpoint
    reason: str  # FAILOVER | FAILBACK

    def log_fields(self) -> dict[str, str]:
        return {
            "side": self.side,
            "reason": self.reason,
            "from": str(self.source),
            "to": str(self.target),
        }


class Failover:
    """The endpoints of one side (primary first) and the rules for moving between them."""

    def __init__(
        self,
        side: str,
        endpoints: Sequence[Endpoint],
        failover_after: float = 10.0,
        failback_after: float | None = 60.0,
    ) -> None:
        if not endpoints:
            raise ValueError("a side needs at least one endpoint")
        self.side = side
        self.endpoints = list(endpoints)
        self.failover_after = failover_after
        self.failback_after = failback_after
        self.active = 0
        self.moves: Counter[str] = Counter({FAILOVER: 0, FAILBACK: 0})
        self.probes: Counter[str] = Counter({"ok": 0, "failed": 0})
        self._up: Counter[int] = Counter()  # connections up, per endpoint index
        self._failing_since: float | None = None
        self._healthy_since: float | None = None
        self._watchers: list[Callable[[Move], None]] = []

    @property
    def can_move(self) -> bool:
        return len(self.endpoints) > 1

    @property
    def needs_probe(self) -> bool:
        """On a failover endpoint, with failback enabled: the primary must be probed."""
        return self.active != 0 and self.failback_after is not None

    @property
    def probe_interval(self) -> float:
        # A handful of probes inside failback_after; at most one CONNECT a second (AWS IoT
        # Core's per-client-id limit) and at least one every 15 s.
        return min(15.0, max(1.0, (self.failback_after or 60.0) / 4))

    def dial(self) -> tuple[int, Endpoint]:
        """The endpoint to connect to now, with its index (to report back)."""
        return self.active, self.endpoints[self.active]

    def connected(self, index: int) -> None:
        self._up[index] += 1
        if index == self.active:
            self._failing_since = None

    def lost(self, index: int) -> None:
        self._up[index] -= 1

    def failed(self, index: int, started: float, now: float) -> Move | None:
        """A connect to ``index`` that started at ``started`` failed at ``now``."""
        if index != self.active or self._up[index] > 0:
            return None  # a late report about an endpoint we left, or the endpoint is proven
        if self._failing_since is None:
            self._failing_since = started
        if not self.can_move or now - self._failing_since < self.failover_after:
            return None
        return self._move((self.active + 1) % len(self.endpoints), FAILOVER)

    def retry_delay(self, delay: float, now: float) -> float:
        """A backoff delay, cut short so that the next attempt comes when a move is due."""
        if not self.can_move or self._failing_since is None:
            return delay
        return max(0.0, min(delay, self._failing_since + self.failover_after - now))

    def probed(self, ok: bool, now: float) -> Move | None:
        """A probe CONNECT to the primary went ``ok`` (or not) at ``now``."""
        self.probes["ok" if ok else "failed"] += 1
        if not self.needs_probe:
            return None
        if not ok:
            self._healthy_since = None
            return None
        if self._healthy_since is None:
            self._healthy_since = now
        if now - self._healthy_since < (self.failback_after or 0.0):
            return None
        return self._move(0, FAILBACK)

    def on_move(self, callback: Callable[[Move], None]) -> None:
        """``callback`` runs after every move: links waiting out a backoff dial the new
        endpoint at once, and after a failback connections elsewhere follow."""
        self._watchers.append(callback)

    def _move(self, to: int, reason: str) -> Move:
        move = Move(self.side, self.endpoints[self.active], self.endpoints[to], reason)
        self.active = to
        self._failing_since = None
        self._healthy_since = None
        self.moves[reason] += 1
        for callback in self._watchers:
            callback(move)
        return move


def log_move(log: Any, move: Move) -> None:
    log.warning("failover.moved", **move.log_fields())


class _Ignore:
    """The listener of a probe connection: it subscribes to nothing and publishes nothing."""

    def on_message(self, conn: Any, msg: Any) -> bool:
        return True

    def on_puback(self, conn: Any, packet_id: int, reason_code: int) -> None:
        pass

    def on_writable(self, conn: Any, writable: bool) -> None:
        pass

    def on_connection_lost(self, conn: Any, exc: BaseException | None) -> None:
        pass


class Failback(Service):
    """Probes the primary while a side runs on a failover endpoint; the policy decides."""

    def __init__(
        self,
        failover: Failover,
        options: SessionOptions,
        connect_timeout: float,
        factory: ConnectionFactory,
    ) -> None:
        super().__init__()
        self.failover = failover
        self.options = options
        self.connect_timeout = connect_timeout
        self._factory = factory
        self._log = structlog.get_logger().bind(side=failover.side)

    async def start(self) -> None:
        if self.failover.can_move and self.failover.failback_after is not None:
            self.spawn(self._run(), name=f"failback-{self.failover.side}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.failover.probe_interval)
            if not self.failover.needs_probe:
                continue
            error = await self.probe()
            move = self.failover.probed(error is None, loop.time())
            if error is not None:
                self._log.info(
                    "failover.probe_failed", endpoint=str(self.failover.endpoints[0]), error=error
                )
            if move is not None:
                log_move(self._log, move)

    async def probe(self) -> str | None:
        """One real CONNECT to the primary; None when it was accepted, else why not."""
        conn: Connection = self._factory(self.options, _Ignore())
        try:
            await conn.connect(self.failover.endpoints[0], self.connect_timeout)
        except ConnectionFailed as exc:
            conn.abort()
            return str(exc)
        await conn.disconnect()
        return None


def failover_metrics(direction: str, sides: Sequence[Failover]) -> Iterator[Metric]:
    """Where each side is, how often it moved, how the failback probes went."""
    active = GaugeMetricFamily(
        "mqtt_bridge_endpoint_active",
        "1 on the endpoint a side dials now (index 0: url; 1…: failover_urls).",
        labels=["direction", "side", "index", "endpoint"],
    )
    moves = CounterMetricFamily(
        "mqtt_bridge_failovers",
        "Moves between endpoints: failover (connects failed), failback (the primary is back).",
        labels=["direction", "side", "reason"],
    )
    probes = CounterMetricFamily(
        "mqtt_bridge_failback_probes",
        "CONNECTs that probed the primary while running on a failover endpoint.",
        labels=["direction", "side", "result"],
    )
    for fo in sides:
        for i, endpoint in enumerate(fo.endpoints):
            active.add_metric([direction, fo.side, str(i), str(endpoint)], int(i == fo.active))
        for reason, count in sorted(fo.moves.items()):
            moves.add_metric([direction, fo.side, reason], count)
        for result, count in sorted(fo.probes.items()):
            probes.add_metric([direction, fo.side, result], count)
    yield from (active, moves, probes)
