"""The bridge: source → bounded flow → target → in-order source ack.

``Bridge`` wires the parts (``wiring``), runs the hot path and owns the lifecycle; the
parts live in their own modules behind named contracts (``target.Target``,
``acks.AckQueue``, ``deadletter.DeadLetterSink``, ``flow.WhenFull``).

Everything on the hot path is a synchronous callback: a PUBLISH is parsed, routed,
admitted and queued for its target connection within one ``data_received`` call, and
the target's PUBACK releases the source acknowledgement in the same way. No task is
created per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import structlog

from bridge import archive as archive_format
from bridge import mqtt_codec as codec
from bridge.acks import AckQueue, Pending
from bridge.archive import ARCHIVE, S3Archive
from bridge.config import HOP_MARKER, BridgeConfig
from bridge.deadletter import ArchiveDeadLetters, DeadLetterSink, LogDeadLetters
from bridge.errors import StartupError
from bridge.flow import Flow, WhenFull
from bridge.http import HttpServer, probe_handlers
from bridge.message import Envelope
from bridge.metrics import Probe, make_registry
from bridge.mqtt_codec import Publish
from bridge.outcome import DELIVERED, EXPIRED, Outcome
from bridge.policy import POISON_DROPS
from bridge.routing import TopicFilter, TopicTemplate, topic_name_problem
from bridge.stats import Stats
from bridge.target import Target
from bridge.watchdog import Watchdog
from bridge.wiring import make_archive, make_source, make_target

# MQTT 5 properties a republished message keeps. Topic alias and subscription
# identifiers belong to one connection; the expiry is rewritten as what remains.
_PASSTHROUGH = (
    codec.PAYLOAD_FORMAT,
    codec.CONTENT_TYPE,
    codec.RESPONSE_TOPIC,
    codec.CORRELATION_DATA,
)


class CompiledRoute:
    __slots__ = ("filter", "index", "label", "qos", "retain", "template")

    def __init__(self, index: int, label: str, source: str, target: str, qos: int, retain: bool):
        self.index = index
        self.label = label
        self.filter = TopicFilter.parse(source)
        self.template = TopicTemplate.parse(target, self.filter)
        self.qos = qos
        self.retain = retain


class Bridge:
    """One worker. ``async with Bridge(cfg) as b: await b.serve(stop)``."""

    def __init__(self, cfg: BridgeConfig, dead_letters: DeadLetterSink | None = None) -> None:
        self.cfg = cfg
        self.log = structlog.get_logger()
        self.routes = [
            CompiledRoute(i, r.label, r.source, r.target, r.qos, r.retain)
            for i, r in enumerate(cfg.routes)
        ]
        labels = [r.label for r in self.routes]
        if len(set(labels)) != len(labels):
            # Two routes on one filter still need distinct metric labels.
            labels = [f"{label}#{i}" for i, label in enumerate(labels)]
            for route, label in zip(self.routes, labels, strict=True):
                route.label = label
        self.stats = Stats(labels)
        self.flow = Flow(cfg.flow.max_inflight, cfg.flow.max_inflight_bytes)
        self.archive: S3Archive | None = make_archive(cfg)
        self.dead_letters: DeadLetterSink = dead_letters or (
            ArchiveDeadLetters(self.archive, self._record) if self.archive else LogDeadLetters()
        )
        if self.archive is None and dead_letters is None:
            self.log.warning(
                "dead_letters.not_durable",
                note="no backup.s3: dead letters are logged (without payload) and counted only",
            )
        self._target_v5 = cfg.target.protocol == "5"
        self._marker = (HOP_MARKER, cfg.instance_id)
        self._marker_only = codec.encode_properties({codec.USER_PROPERTY: [self._marker]})
        self._loop = asyncio.get_running_loop()
        self.topic_limits = cfg.target.limits.topic_limits()
        self.source = make_source(cfg, self.flow, self._handle, self.stats)
        self.target: Target = make_target(cfg, self._on_done)
        self.watchdog = Watchdog()
        self._stack = contextlib.AsyncExitStack()

    # ---- hot path ------------------------------------------------------------------

    def _handle(self, acks: AckQueue, msg: Publish) -> bool:
        size = len(msg.payload)
        if not self.flow.try_admit(size):
            if self.flow.when_full(msg.qos) is WhenFull.DROP:
                route = self._match(msg.topic)
                self.stats.dropped[(route[0].index if route else 0, "full")] += 1
                return True
            return False  # held by the connection, which stops reading
        found = self._match(msg.topic)
        route_index = found[0].index if found else 0
        pending = acks.admit(msg.packet_id, msg.qos, size, route_index)
        self.stats.received[route_index] += 1
        props = msg.properties
        if props is not None and self._has_marker(props):
            self.stats.dropped[(route_index, "loop")] += 1
            pending.finish()
            return True
        # Refused by the connection (too large), or a name no target can take.
        problem = msg.refused or topic_name_problem(
            msg.topic, props.get(codec.TOPIC_ALIAS) if props else None
        )
        if problem is not None:
            env = self._envelope(msg, pending, msg.topic, None, 0, None)
            self._dead_letter(env, problem, problem.split(":", 1)[0])
            return True
        if found is None:
            env = self._envelope(msg, pending, msg.topic, None, 0, None)
            self._dead_letter(env, "no route matches the topic", "no_route")
            return True
        matched, target_topic = found
        env = self._envelope(msg, pending, target_topic, props, matched.qos, matched)
        problem = self.topic_limits.violation(env.topic, size)
        if problem is not None:
            self._dead_letter(env, problem, problem.split(":", 1)[0])
            return True
        archive = self.archive
        if archive is not None:
            if archive.required:
                pending.holds += 1
                archive.add(ARCHIVE, self._record(env), pending.finish)
            else:
                archive.add(ARCHIVE, self._record(env), None)
        self.target.submit(env)
        return True

    def _match(self, topic: str) -> tuple[CompiledRoute, str] | None:
        for route in self.routes:
            captures = route.filter.captures(topic)
            if captures is not None:
                return route, route.template.render(topic, captures)
        return None

    def _has_marker(self, props: codec.Properties) -> bool:
        user = props.get(codec.USER_PROPERTY)
        return user is not None and any(key == HOP_MARKER for key, _ in user)

    def _envelope(
        self,
        msg: Publish,
        pending: Pending,
        target_topic: str,
        props: codec.Properties | None,
        route_qos: int,
        route: CompiledRoute | None,
    ) -> Envelope:
        now = self._loop.time()
        expires_at = None
        out: codec.Properties | bytes | None = None
        if self._target_v5:
            if props:
                out = {key: props[key] for key in _PASSTHROUGH if key in props}
                expiry = props.get(codec.MESSAGE_EXPIRY)
                if expiry is not None:
                    expires_at = now + expiry
                user = props.get(codec.USER_PROPERTY)
                out[codec.USER_PROPERTY] = [*user, self._marker] if user else [self._marker]
            else:
                out = self._marker_only  # encoded once: most messages carry no properties
        return Envelope(
            source_topic=msg.topic,
            topic=target_topic.encode(),
            payload=msg.payload,
            qos=min(msg.qos, route_qos),
            retain=msg.retain and route is not None and route.retain,
            properties=out,
            received_at=now,
            expires_at=expires_at,
            route=pending.route,
            pending=pending,
            source=msg,
            # Wall-clock time only matters to the archive record.
            received_epoch=time.time() if self.archive is not None else 0.0,
        )

    def _record(self, env: Envelope) -> dict[str, Any]:
        return archive_format.record(
            env, self.cfg.direction, self.cfg.instance_id, self.routes[env.route].label
        )

    def _on_done(self, env: Envelope, outcome: Outcome) -> None:
        pending = env.pending
        if outcome is DELIVERED:
            self.stats.published[pending.route] += 1
            self.stats.observe_latency(pending.route, self._loop.time() - env.received_at)
            pending.finish()
        elif outcome is EXPIRED:
            self.stats.dropped[(pending.route, "expired")] += 1
            pending.finish()
        else:
            self._dead_letter(env, *outcome.dead_letter_reason(POISON_DROPS))

    def _dead_letter(self, env: Envelope, reason: str, label: str | None = None) -> None:
        pending = env.pending
        self.stats.dead_lettered[(pending.route, label or reason.split(" (", 1)[0])] += 1
        self.dead_letters.submit(env, reason, pending.finish)

    # ---- lifecycle -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.source.subscribed and self.target.ready

    def readiness(self) -> dict[str, Any]:
        """What /readyz answers: ready, and the facts it is made of."""
        sources, targets = self.source.connections(), self.target.connections()
        links = [("source", c) for c in sources] + [("target", c) for c in targets]
        return {
            "ready": self.ready,
            "source_subscribed": self.source.subscribed,
            "target_connected": [c.up for c in targets],
            # Why a connection is down, in the words of its last failure.
            "problems": [f"{side} {c.index}: {c.problem}" for side, c in links if c.problem],
        }

    async def __aenter__(self) -> Bridge:
        await self._stack.__aenter__()
        try:
            await self._enter()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _enter(self) -> None:
        await self._stack.enter_async_context(self.watchdog)
        listen = self.cfg.http.host_port
        if listen is not None:
            probe = Probe(
                direction=self.cfg.direction,
                stats=self.stats,
                flow=self.flow,
                sources=self.source.connections,
                targets=self.target.connections,
                ready=lambda: self.ready,
                archive=self.archive,
                loop_lag=lambda: self.watchdog.lag,
            )
            handlers = probe_handlers(
                make_registry(probe), lambda: self.watchdog.healthy, self.readiness
            )
            try:
                await self._stack.enter_async_context(HttpServer(listen[0], listen[1], handlers))
            except OSError as exc:  # in use, or not an address of this host
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise StartupError(
                    f"http.listen {self.cfg.http.listen}: cannot listen: {why}"
                ) from None
        if self.archive is not None:
            await self._stack.enter_async_context(self.archive)
        # Targets first: a source message must find a connection to go to.
        await self._stack.enter_async_context(self.target)
        await self._stack.enter_async_context(self.source)

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.__aexit__(None, None, None)

    async def serve(self, stop: asyncio.Event) -> bool:
        """Run until ``stop`` is set, then leave gracefully. True when fully drained."""
        stats_task = asyncio.create_task(self._report_stats(), name="stats")
        try:
            await stop.wait()
        finally:
            stats_task.cancel()
        return await self.leave()

    async def leave(self) -> bool:
        """Unsubscribe, drain what is in flight, disconnect — within shutdown.deadline."""
        cfg = self.cfg.shutdown
        started = self._loop.time()
        self.log.info("bridge.leaving", inflight=self.flow.messages, deadline=cfg.deadline)
        drained = False
        try:
            async with asyncio.timeout(cfg.deadline):
                await self.source.unsubscribe()
                while True:
                    now = self._loop.time()
                    quiet = now - max(self.source.last_received, started) >= cfg.quiet
                    if quiet and self.archive is not None:
                        # `required` holds wait for their objects: write them now.
                        self.archive.seal_all()
                    if self.flow.messages == 0 and quiet:
                        drained = True
                        break
                    await asyncio.sleep(0.02)
                if self.archive is not None:
                    await asyncio.shield(self.archive.flush())
        except TimeoutError:
            pass
        if self.archive is not None and self.archive.pending:
            self.log.warning(
                "archive.unflushed",
                batches=self.archive.pending,
                bytes=self.archive.buffered,
                note="the deadline passed before these records reached S3",
            )
        await asyncio.shield(self.target.close())
        # Decide at the last moment, with reading stopped: a message that came in after
        # the drain (a reconnect, a late queue flush) must keep the session alive.
        self.source.stop_reading()
        left = self.flow.messages
        drained = drained and left == 0 and not self.source.has_unread
        # A drained MQTT 5 session is empty: tell the broker to drop it (expiry 0).
        # Otherwise keep it, so the unfinished messages wait for this instance_id.
        expiry = 0 if drained and self.cfg.source.protocol == "5" else None
        await asyncio.shield(self.source.close(expiry))
        elapsed = round(self._loop.time() - started, 3)
        if drained:
            self.log.info("bridge.left", drained=True, seconds=elapsed, **self.stats.summary())
        else:
            self.log.warning(
                "bridge.left",
                drained=False,
                seconds=elapsed,
                unfinished=left,
                note="unfinished messages stay in the source session for the next start",
                **self.stats.summary(),
            )
        return drained

    async def _report_stats(self) -> None:
        interval = self.cfg.log.stats_interval
        while True:
            await asyncio.sleep(interval)
            self.log.info(
                "bridge.stats",
                inflight=self.flow.messages,
                inflight_bytes=self.flow.bytes,
                ready=self.ready,
                **self.stats.summary(),
            )
