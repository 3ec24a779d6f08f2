"""Live reload (SIGHUP): read the configuration file again and apply what can change
without a reconnect — cohorts and their id files, pacing rates, the log level.

What changed is decided by a pure function (``plan``); applying it is one synchronous
step on the event loop, so no message sees half a reload. Anything else that changed is
logged as needing a restart and keeps its running value. A file that fails validation
changes nothing and is logged with the same one-line errors ``check`` prints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from bridge.cohort import CohortGate
from bridge.config import BridgeConfig, load_config, located
from bridge.errors import ConfigError
from bridge.pacing import Pacing
from bridge.runtime import set_log_level
from bridge.service import Service
from bridge.stats import Stats
from bridge.target import Target

# Keys applied live; every other change needs a restart.
_LIVE_ROUTE_KEYS = ("device", "cohort")
_LIVE_KEYS = (("target", "limits", "publish_rate"), ("target", "limits", "bytes_rate"),
              ("target", "limits", "burst"), ("log", "level"))  # fmt: skip


class Gated(Protocol):
    """A running route, as far as its cohort goes (``pipeline.CompiledRoute``)."""

    gate: CohortGate | None


@dataclass(frozen=True, slots=True)
class LiveSettings:
    """Everything a reload may change in a running worker."""

    gates: tuple[CohortGate | None, ...]  # per route
    publish_rate: float | None
    bytes_rate: float | None
    burst: float
    log_level: str

    @classmethod
    def of(cls, cfg: BridgeConfig) -> LiveSettings:
        limits = cfg.target.limits
        return cls(
            tuple(route.gate() for route in cfg.routes),
            limits.publish_rate,
            limits.bytes_rate,
            limits.burst,
            cfg.log.level,
        )

    def pacing(self, connect_interval: float) -> Pacing:
        return Pacing(self.publish_rate, self.bytes_rate, self.burst, connect_interval)


@dataclass(frozen=True, slots=True)
class Plan:
    live: LiveSettings  # what runs after the reload
    changed: list[str]  # keys applied now
    needs_restart: list[str]  # keys that changed but keep their running value


def plan(running: BridgeConfig, live: LiveSettings, new: BridgeConfig) -> Plan:
    """What a reload from ``running`` (as started, with ``live`` applied since) to ``new`` does."""
    restart = _changed(_fixed_part(running), _fixed_part(new))
    wanted = LiveSettings.of(new)
    gates = list(live.gates)
    changed = []
    if len(running.routes) == len(new.routes):
        for i, gate in enumerate(wanted.gates):
            # A route whose own subscription or mapping changed keeps its cohort too:
            # the new cohort belongs to a route that is not running yet.
            if gate != gates[i] and not any(_under(key, f"routes[{i}]") for key in restart):
                gates[i] = gate
                changed.append(f"routes[{i}].cohort")
    after = replace(wanted, gates=tuple(gates))
    for name, key in (
        ("publish_rate", "target.limits.publish_rate"),
        ("bytes_rate", "target.limits.bytes_rate"),
        ("burst", "target.limits.burst"),
        ("log_level", "log.level"),
    ):
        if getattr(after, name) != getattr(live, name):
            changed.append(key)
    return Plan(after, changed, restart)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((f"{prefix}.", f"{prefix}["))


def _fixed_part(cfg: BridgeConfig) -> dict[str, Any]:
    """The configuration without the keys a reload applies (secrets are never in a dump)."""
    dump = cfg.model_dump(mode="json")
    for route in dump["routes"]:
        for key in _LIVE_ROUTE_KEYS:
            route.pop(key, None)
    for path in _LIVE_KEYS:
        node = dump
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    return dump


def _changed(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted keys where ``a`` and ``b`` differ (a list of another length is one key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(a.keys() | b.keys()):
            out += _changed(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [key for i, (x, y) in pairs for key in _changed(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


class Reloader(Service):
    """Reloads on ``request()`` (the SIGHUP handler), one reload at a time: a signal that
    arrives during a reload triggers one more afterwards."""

    def __init__(
        self,
        path: str | Path,
        cfg: BridgeConfig,
        routes: Sequence[Gated],
        target: Target,
        stats: Stats,
    ) -> None:
        super().__init__()
        self.path = str(path)
        self.cfg = cfg
        self.live = LiveSettings.of(cfg)
        self._routes = routes
        self._target = target
        self._stats = stats
        self._wanted = asyncio.Event()
        self._log = structlog.get_logger().bind(component="reload")

    async def start(self) -> None:
        self.spawn(self._serve(), name="reload")

    def request(self) -> None:
        self._wanted.set()

    async def _serve(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.reload()
            except Exception:  # a reload must never take the worker down
                self._stats.reloads["refused"] += 1
                self._log.exception("reload.failed", path=self.path, note="nothing changed")

    async def reload(self) -> bool:
        """Read, validate and apply the file; True when applied."""
        try:
            # Off the event loop: id files can be large, and messages keep flowing meanwhile.
            new = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            self._stats.reloads["refused"] += 1
            self._log.error(
                "reload.refused",
                path=self.path,
                errors=located(self.path, exc.problems),
                note="nothing changed: the running configuration stays",
            )
            return False
        decided = plan(self.cfg, self.live, new)
        self._apply(decided.live)
        self._stats.reloads["applied"] += 1
        self._log.info(
            "reload.applied",
            path=self.path,
            changed=decided.changed,
            cohorts=[
                {
                    "route": self.cfg.routes[i].label,
                    "percent": gate.cohort.percent,
                    "include": len(gate.cohort.include),
                    "exclude": len(gate.cohort.exclude),
                }
                for i, gate in enumerate(decided.live.gates)
                if gate is not None
            ],
        )
        if decided.needs_restart:
            self._log.warning(
                "reload.needs_restart",
                keys=decided.needs_restart,
                note="these keep their running values until the worker restarts",
            )
        return True

    def _apply(self, live: LiveSettings) -> None:
        """One synchronous step: no message is handled between two of these assignments."""
        for route, gate in zip(self._routes, live.gates, strict=True):
            route.gate = gate
        if _rates(live) != _rates(self.live):
            self._target.repace(live.pacing(self.cfg.target.limits.connect_interval))
        set_log_level(live.log_level)
        self.live = live


def _rates(live: LiveSettings) -> tuple[float | None, float | None, float]:
    return live.publish_rate, live.bytes_rate, live.burst
