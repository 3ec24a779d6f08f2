"""Give a share back while the target is unreachable, where someone else can take it.

A worker whose target is down keeps taking its share of a group: the broker hands it
1/N of the traffic, which then waits in our flow and our session while the group's other
members (the legacy service during a DTB migration) could have consumed it. A route with
``release_when_target_down: <seconds>`` unsubscribes its shared subscription once no
target connection has been up that long; what is already in our session stays there and
is delivered when the target is back. It subscribes again only when a target connection
is up *and* a probe publish was acknowledged (``Target.probe``): a connection that
accepts CONNECT but swallows publishes must not take the share back.

Only for share groups with other consumers: in a group of bridge workers alone, all of
them would release and the broker would drop what is published (``check`` refuses the
option on a route without a share group; the README says the rest).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from bridge import mqtt_codec as codec
from bridge.service import Service
from bridge.source import Source
from bridge.target import Target

PROBE_TIMEOUT = 5.0


@dataclass(slots=True)
class Releasable:
    """One route that may give its share back."""

    label: str
    subscription: str  # $share/<group>/<filter>
    after: float  # seconds without any target connection
    released: bool = False
    releases: int = 0
    rejoins: int = 0


def due(route: Releasable, target_up: bool, down_for: float) -> bool:
    """True when the route must be released now."""
    return not route.released and not target_up and down_for >= route.after


class Releaser(Service):
    def __init__(
        self,
        routes: list[Releasable],
        source: Source,
        target: Target,
        probe_topic: bytes,
        probe_properties: codec.Properties | None,
        tick: float = 0.5,
    ) -> None:
        super().__init__()
        self.routes = routes
        self._source = source
        self._target = target
        self._probe_topic = probe_topic
        self._probe_properties = probe_properties
        self._tick = tick
        self._log = structlog.get_logger().bind(component="release")

    async def start(self) -> None:
        if self.routes:
            self.spawn(self._watch(), name="release")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        last_up = loop.time()
        while True:
            await asyncio.sleep(self._tick)
            now = loop.time()
            up = any(c.up for c in self._target.connections())
            if up:
                last_up = now
            for route in self.routes:
                if due(route, up, now - last_up):
                    await self._source.release(route.subscription)
                    route.released = True
                    route.releases += 1
                    self._log.warning(
                        "route.released",
                        route=route.label,
                        subscription=route.subscription,
                        target_down_for=round(now - last_up, 1),
                        note="the group's other members take its messages; what is already "
                        "in this worker's session waits for the target",
                    )
                elif route.released and up and await self._proven():
                    await self._source.rejoin(route.subscription)
                    route.released = False
                    route.rejoins += 1
                    self._log.info(
                        "route.rejoined", route=route.label, subscription=route.subscription
                    )

    async def _proven(self) -> bool:
        return await self._target.probe(self._probe_topic, self._probe_properties, PROBE_TIMEOUT)
