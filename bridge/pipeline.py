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
from bridge.acks import INTERNAL, AckQueue, Pending
from bridge.archive import ARCHIVE, S3Archive
from bridge.cohort import CohortGate
from bridge.config import HOP_MARKER, BridgeConfig
from bridge.deadletter import ArchiveDeadLetters, DeadLetterSink, LogDeadLetters
from bridge.errors import StartupError
from bridge.failover import failover_metrics
from bridge.flow import Flow, WhenFull
from bridge.http import HttpServer, probe_handlers
from bridge.message import Envelope
from bridge.metrics import Probe, make_registry
from bridge.mqtt_codec import Publish
from bridge.outcome import DELIVERED, EXPIRED, Outcome
from bridge.policy import POISON_DROPS
from bridge.reasons import dead_letter_reasons
from bridge.release import Releasable, Releaser
from bridge.route_index import RouteIndex
from bridge.routing import TopicFilter, TopicTemplate, topic_name_problem
from bridge.stats import Stats
from bridge.target import Target
from bridge.watchdog import Watchdog
from bridge.wiring import (
    make_adopter,
    make_archive,
    make_failback,
    make_failover,
    make_heartbeat,
    make_members,
    make_source,
    make_target,
    probe_of,
)

# MQTT 5 properties a republished message keeps. Topic alias and subscription
# identifiers belong to one connection; the expiry is rewritten as what remains.
PASSTHROUGH = (
    codec.PAYLOAD_FORMAT,
    codec.CONTENT_TYPE,
    codec.RESPONSE_TOPIC,
    codec.CORRELATION_DATA,
)


class CompiledRoute:
    __slots__ = ("filter", "gate", "index", "label", "qos", "retain", "template")

    def __init__(
        self,
        index: int,
        label: str,
        source: str,
        target: str,
        qos: int,
        retain: bool,
        gate: CohortGate | None = None,
    ):
        self.index = index
        self.label = label
        self.filter = TopicFilter.parse(source)
        self.template = TopicTemplate.parse(target, self.filter)
        self.qos = qos
        self.retain = retain
        # Swapped whole by a live reload (one assignment between two messages: atomic).
        self.gate = gate


class Bridge:
    """One worker. ``async with Bridge(cfg) as b: await b.serve(stop)``.

    With ``worker=False`` (``mqtt-bridge adopt``) it only forwards what ``adopt()`` drains:
    no subscription, no registry, no HTTP, and target client ids of its own.
    """

    def __init__(
        self, cfg: BridgeConfig, dead_letters: DeadLetterSink | None = None, worker: bool = True
    ) -> None:
        self.cfg = cfg
        self.worker = worker
        self.log = structlog.get_logger()
        self.routes = [
            CompiledRoute(i, r.label, r.source, r.target, r.qos, r.retain, r.gate())
            for i, r in enumerate(cfg.routes)
        ]
        labels = [r.label for r in self.routes]
        if len(set(labels)) != len(labels):
            # Two routes on one filter still need distinct metric labels.
            labels = [f"{label}#{i}" for i, label in enumerate(labels)]
            for route, label in zip(self.routes, labels, strict=True):
                route.label = label
        self.stats = Stats(labels)
        self._routes = RouteIndex(self.routes)
        self.topic_limits = cfg.target.limits.topic_limits()
        self.stats.seed_dead_letters(
            dead_letter_reasons(self.topic_limits, cfg.target.protocol == "5")
        )
        self.flow = Flow(
            cfg.flow.max_inflight,
            cfg.flow.max_inflight_bytes,
            WhenFull(cfg.flow.qos0_when_full),
        )
        self.archive: S3Archive | None = make_archive(cfg, self.flow)
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
        # One endpoint policy per side, shared by its links and the heartbeat's link there.
        self.failovers = (make_failover("source", cfg.source), make_failover("target", cfg.target))
        source_fo, target_fo = self.failovers
        self.failed: str | None = None  # why the worker stopped itself (exit 2)
        self._fatal = asyncio.Event()
        self.registry = (
            make_members(cfg, self._adopt, self._fail, failover=source_fo) if worker else None
        )
        # Member records live on the source broker: a route that could match them must
        # not forward them (cost: one prefix test per message, only for such routes).
        root = f"{cfg.membership.topic_root}/"
        self._internal_prefix = (
            root
            if self.registry is not None
            and any(r.filter.matches(root + "x/y") for r in self.routes)
            else None
        )
        self.source = make_source(
            cfg, self.flow, self._handle, self.stats, self.registry, failover=source_fo
        )
        self.target: Target = make_target(
            cfg, self._on_done, "tgt" if worker else "adopt", failover=target_fo
        )
        self.heartbeat = (
            make_heartbeat(
                cfg, source_fo, target_fo, lambda: self.source.subscribed, lambda: self.target.ready
            )
            if worker
            else None
        )
        self._heartbeat_topic = self.heartbeat.topics.source if self.heartbeat else None
        self.releaser = Releaser(
            [
                Releasable(route.label, r.subscription, r.release_when_target_down)
                for route, r in zip(self.routes, cfg.routes, strict=True)
                if r.release_when_target_down is not None and worker
            ],
            self.source,
            self.target,
            *probe_of(cfg),
        )
        self.watchdog = Watchdog()
        self._stack = contextlib.AsyncExitStack()

    # ---- hot path ------------------------------------------------------------------

    def _handle(self, acks: AckQueue, msg: Publish) -> bool:
        if msg.topic == self._heartbeat_topic:
            return self._carry_heartbeat(acks, msg)
        internal = self._internal_prefix
        if internal is not None and msg.topic.startswith(internal):
            # A member record a route could match: not traffic, outside the flow bound.
            acks.admit_internal(msg.packet_id, msg.qos).finish()
            return True
        size = len(msg.payload)
        if not self.flow.try_admit(size):
            if self.flow.when_full(msg.qos) is WhenFull.DROP:
                route = self._match(msg.topic)
                self.stats.dropped[(route[0].index if route else 0, "full")] += 1
                return True
            return False  # held by the connection, which stops reading
        found = self._match(msg.topic)
        route_index = found[0].index if found else 0
        now = self._loop.time()
        pending = acks.admit(msg.packet_id, msg.qos, size, route_index, now)
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
            env = self._envelope(msg, pending, msg.topic, None, 0, None, now)
            self._dead_letter(env, problem, problem.split(":", 1)[0])
            return True
        if found is None:
            env = self._envelope(msg, pending, msg.topic, None, 0, None, now)
            self._dead_letter(env, "no route matches the topic", "no_route")
            return True
        matched, target_topic = found
        if matched.gate is not None and not matched.gate.admits(msg.topic):
            return self._skip(pending, route_index, "cohort")
        env = self._envelope(msg, pending, target_topic, props, matched.qos, matched, now)
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

    def _carry_heartbeat(self, acks: AckQueue, msg: Publish) -> bool:
        """The heartbeat's own route: in line for the source ack, never counted, archived or
        dead-lettered; outside the flow bound (heartbeat.MAX_CARRIED bounds it)."""
        heartbeat = self.heartbeat
        assert heartbeat is not None
        pending = acks.admit_internal(msg.packet_id, msg.qos)
        if not heartbeat.take(msg.payload):
            pending.finish()
            return True
        env = self._envelope(
            msg, pending, heartbeat.topics.target, None, 1, None, self._loop.time()
        )
        env.qos = 1  # subscribed at QoS 0; crosses at QoS 1 to prove the target's PUBACK
        self.target.submit(env)
        return True

    def _match(self, topic: str) -> tuple[CompiledRoute, str] | None:
        # First match wins, in configuration order; the gate is checked by the caller.
        return self._routes.match(topic)

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
        now: float,
    ) -> Envelope:
        expires_at = None
        out: codec.Properties | bytes | None = None
        if self._target_v5:
            if props:
                out = {key: props[key] for key in PASSTHROUGH if key in props}
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
        if pending.route == INTERNAL and self.heartbeat is not None:
            self.heartbeat.forwarded(env.payload, outcome)
            pending.finish()
            return
        if outcome is DELIVERED:
            now = self._loop.time()
            self.stats.published[pending.route] += 1
            self.stats.last_published[pending.route] = now
            self.stats.observe_latency(pending.route, now - env.received_at)
            pending.finish()
        elif outcome is EXPIRED:
            self.stats.dropped[(pending.route, "expired")] += 1
            pending.finish()
        else:
            self._dead_letter(env, *outcome.dead_letter_reason(POISON_DROPS))

    def _skip(self, pending: Pending, route_index: int, reason: str) -> bool:
        """Acknowledged and counted, not forwarded: the copy route does not carry it."""
        self.stats.skipped[(route_index, reason)] += 1
        pending.finish()
        return True

    def _dead_letter(self, env: Envelope, reason: str, label: str | None = None) -> None:
        pending = env.pending
        self.stats.dead_lettered[(pending.route, label or reason.split(" (", 1)[0])] += 1
        self.dead_letters.submit(env, reason, pending.finish)

    # ---- lifecycle -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        heartbeat = self.heartbeat
        crossing = heartbeat is None or heartbeat.fresh
        return self.source.subscribed and self.target.ready and crossing

    def readiness(self) -> dict[str, Any]:
        """What /readyz answers: ready, and the facts it is made of."""
        sources, targets = self.source.connections(), self.target.connections()
        links = [("source", c) for c in sources] + [("target", c) for c in targets]
        state = {
            "ready": self.ready,
            "source_subscribed": self.source.subscribed,
            "target_connected": [c.up for c in targets],
            # Why a connection is down, in the words of its last failure.
            "problems": [f"{side} {c.index}: {c.problem}" for side, c in links if c.problem],
        }
        if self.heartbeat is not None:
            state["heartbeat"] = self.heartbeat.state()
        return state

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
        if listen is not None and self.worker:
            probe = Probe(
                direction=self.cfg.direction,
                instance=self.cfg.instance_id,
                stats=self.stats,
                flow=self.flow,
                sources=self.source.connections,
                targets=self.target.connections,
                ready=lambda: self.ready,
                archive=self.archive,
                loop_lag=lambda: self.watchdog.lag,
                releases=lambda: self.releaser.routes,
                adoptions=self._adoptions,
                cohorts=lambda: [(r.label, r.gate.cohort.percent) for r in self.routes if r.gate],
                clock=self._loop.time,
                extra=[
                    lambda d: failover_metrics(d, self.failovers),
                    *([self.heartbeat.metrics] if self.heartbeat else []),
                ],
            )
            handlers = probe_handlers(
                make_registry(probe, self._target_v5),
                lambda: self.watchdog.healthy,
                self.readiness,
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
        if self.registry is not None:
            # Before the source: a duplicate instance_id must not connect at all.
            await self._stack.enter_async_context(self.registry)
        # Targets first: a source message must find a connection to go to.
        await self._stack.enter_async_context(self.target)
        if self.worker:
            await self._stack.enter_async_context(self.source)
            for failover in self.failovers:
                await self._stack.enter_async_context(make_failback(self.cfg, failover))
            if self.heartbeat is not None:
                await self._stack.enter_async_context(self.heartbeat)
            await self._stack.enter_async_context(self.releaser)

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.__aexit__(None, None, None)

    async def serve(self, stop: asyncio.Event) -> bool:
        """Run until ``stop`` is set, then leave gracefully. True when fully drained."""
        stats_task = asyncio.create_task(self._report_stats(), name="stats")
        stopped = asyncio.create_task(stop.wait(), name="stop")
        fatal = asyncio.create_task(self._fatal.wait(), name="fatal")
        try:
            await asyncio.wait((stopped, fatal), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stats_task, stopped, fatal):
                task.cancel()
        return await self.leave()

    async def leave(self) -> bool:
        """Unsubscribe, drain what is in flight, disconnect — within shutdown.deadline."""
        cfg = self.cfg.shutdown
        started = self._loop.time()
        self.log.info("bridge.leaving", inflight=self.flow.messages, deadline=cfg.deadline)
        drained = False
        try:
            async with asyncio.timeout(cfg.deadline):
                if self.heartbeat is not None:
                    await self.heartbeat.close()  # our own messages stop first
                # A worker that stops itself (a duplicate instance_id) leaves the session
                # alone: it belongs to the other worker as much as to us.
                await self.source.begin_leave("keep" if self.failed else cfg.session)
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
        # A drained MQTT 5 session whose subscriptions others take is empty: it ends
        # (expiry 0). Otherwise it stays, so the unfinished messages wait for this id.
        exits = self.source.exits(drained, self.cfg.source.protocol == "5")
        if self.registry is not None and self.failed is None:
            records = {
                link.options.client_id: e.record
                for link, e in zip(self.source.links, exits, strict=True)
            }
            await asyncio.shield(self.registry.leave(records))
        await asyncio.shield(self.source.close(exits))
        elapsed = round(self._loop.time() - started, 3)
        if drained:
            self.log.info("bridge.left", drained=True, seconds=elapsed, **self._summary())
        else:
            self.log.warning(
                "bridge.left",
                drained=False,
                seconds=elapsed,
                unfinished=left,
                note="unfinished messages stay in the source session for the next start",
                **self._summary(),
            )
        return drained

    def _adoptions(self) -> tuple[int, int]:
        r = self.registry
        return (r.adoptions, r.adoption_failures) if r is not None else (0, 0)

    def _fail(self, reason: str) -> None:
        """Stop this worker: something only the operator can fix (exit 2)."""
        if self.failed is None:
            self.failed = reason
            self.log.error("bridge.stopping", reason=reason)
            self._fatal.set()

    async def adopt(self, client_id: str) -> bool:
        """``mqtt-bridge adopt``: drain and end one session, flush the archive, disconnect."""
        done = await self._adopt(client_id)
        if self.archive is not None:
            await asyncio.shield(self.archive.flush())
        await asyncio.shield(self.target.close())
        return done

    async def _adopt(self, client_id: str) -> bool:
        """Drain and end the session a gone worker left (``membership.Registry``)."""
        link = make_adopter(
            self.cfg, client_id, self.flow, self._handle, self.stats, failover=self.failovers[0]
        )
        done = await link.adopt(
            self.cfg.shutdown.quiet,
            self.cfg.membership.adopt_timeout,
            self.cfg.source.protocol == "5",
        )
        self.log.info(
            "membership.adopted" if done else "membership.adopt_unfinished", client_id=client_id
        )
        return done

    def _summary(self) -> dict[str, int]:
        # The peaks live in the logs, not /metrics: between two scrapes a gauge misses
        # them, and max_over_time() of inflight_messages is what a dashboard wants.
        return {
            **self.stats.summary(),
            "inflight_peak": self.flow.peak_messages,
            "inflight_bytes_peak": self.flow.peak_bytes,
        }

    async def _report_stats(self) -> None:
        interval = self.cfg.log.stats_interval
        while True:
            await asyncio.sleep(interval)
            self.log.info(
                "bridge.stats",
                inflight=self.flow.messages,
                inflight_bytes=self.flow.bytes,
                ready=self.ready,
                **self._summary(),
            )
