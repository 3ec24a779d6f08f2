"""`mqtt-bridge sync-retained`: carry the source broker's retained state to the target.

Shared subscriptions never get retained messages (MQTT 5, 4.8.2), so a worker that
consumes through ``$share`` never carries a device's last status or configuration. This
command subscribes every route's filter without a share group on a clean session of its
own (``<source client id>-sync``), takes the retained messages the broker sends on
subscribe until nothing is in flight and nothing arrived for ``--quiet`` seconds, and
republishes each to its mapped target topic with retain set, QoS 1. The parts are the
live flow's: the flow bound (backpressure: the broker holds the rest), the route's
cohort, the target's limits, the dead-letter sink, the archive, paced target
connections (``<instance_id>-sync-<n>``), and the source acknowledgement only after the
target's.

A retained message with an empty payload is a delete: it is carried as one. A broker
keeps no trace of a delete, so only deletes published while the sync runs are seen
(the live flow carries the later ones on routes with ``retain: true``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from bridge import archive as archive_format
from bridge import mqtt_codec as codec
from bridge.acks import AckQueue, Pending
from bridge.archive import ARCHIVE, S3Archive
from bridge.config import HOP_MARKER, BridgeConfig
from bridge.deadletter import ArchiveDeadLetters, DeadLetterSink, LogDeadLetters
from bridge.flow import Flow, WhenFull
from bridge.message import Envelope
from bridge.mqtt_codec import Publish
from bridge.outcome import DELIVERED, EXPIRED, Outcome
from bridge.pipeline import PASSTHROUGH, CompiledRoute
from bridge.policy import POISON_DROPS
from bridge.routing import plan_subscriptions
from bridge.source import Source, SourceLink
from bridge.stats import Stats
from bridge.target import Target
from bridge.wiring import clean_session, endpoint_of, make_archive, make_target

TAG = "sync"


@dataclass
class SyncOptions:
    route: str | None = None  # a route's name or source filter; default every route
    dry_run: bool = False  # take and count, publish nothing
    quiet: float = 2.0  # done once nothing is in flight and nothing arrived for this long
    timeout: float = 300.0  # give up (exit 1) when not done by then


@dataclass
class SyncSummary:
    dry_run: bool = False
    topics: int = 0  # retained messages taken (one per topic)
    bytes: int = 0  # their payload bytes
    deletes: int = 0  # of them, empty payloads: deletes on the target
    published: int = 0  # acknowledged by the target (dry run: would be published)
    skipped: Counter[str] = field(default_factory=Counter)  # cohort, loop, expired
    dead_lettered: int = 0
    live: int = 0  # not retained: arrived meanwhile, left to the live flow
    errors: list[str] = field(default_factory=list)

    @property
    def unfinished(self) -> int:
        return self.topics - self.published - sum(self.skipped.values()) - self.dead_lettered

    @property
    def ok(self) -> bool:
        return not self.errors and not self.dead_lettered and not self.unfinished

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()) if v)
        published = "would publish (dry run)" if self.dry_run else "retain set, QoS 1, acknowledged"
        return [
            f"topics:        {self.topics}   (retained messages taken; {self.deletes} deletes)",
            f"bytes:         {self.bytes}",
            f"published:     {self.published}   ({published})",
            f"skipped:       {sum(self.skipped.values())}" + (f"   ({reasons})" if reasons else ""),
            f"dead-lettered: {self.dead_lettered}   (reasons in the log and the dead-letter sink)",
            f"live:          {self.live}   (not retained: left to the live flow)",
            *(f"error: {error}" for error in self.errors),
        ]


def select_routes(cfg: BridgeConfig, wanted: str | None) -> list[CompiledRoute]:
    """The routes to sync, compiled to republish with retain set at QoS 1."""
    routes = [
        CompiledRoute(i, r.label, r.source, r.target, 1, True, r.gate())
        for i, r in enumerate(cfg.routes)
        if wanted is None or wanted in (r.label, r.source)
    ]
    if not routes:
        have = ", ".join(r.label for r in cfg.routes)
        raise ValueError(f"--route {wanted!r} matches no route (routes: {have})")
    return routes


class RetainedSync:
    def __init__(self, cfg: BridgeConfig, opts: SyncOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.routes = select_routes(cfg, opts.route)
        self.summary = SyncSummary(dry_run=opts.dry_run)
        self._loop = asyncio.get_running_loop()
        self._log = structlog.get_logger().bind(component="sync_retained")
        self._stats = Stats([r.label for r in self.routes])
        # Retained state is never dropped for room: a full flow holds the broker back.
        self.flow = Flow(cfg.flow.max_inflight, cfg.flow.max_inflight_bytes, WhenFull.BLOCK)
        self._limits = cfg.target.limits.topic_limits()
        self._marker = (HOP_MARKER, cfg.instance_id)
        self._v5 = cfg.target.protocol == "5"
        # A dry run writes nothing anywhere; a real one archives like the live flow, under
        # its own instance name so its objects never collide with a worker's.
        self.archive: S3Archive | None = (
            None if opts.dry_run else make_archive(cfg, instance=f"{cfg.instance_id}-{TAG}")
        )
        self._dead_letters: DeadLetterSink = (
            ArchiveDeadLetters(self.archive, self._record) if self.archive else LogDeadLetters()
        )
        if self.archive is None and not opts.dry_run:
            self._log.warning(
                "dead_letters.not_durable",
                note="no backup.s3: dead letters are logged (without payload) and counted only",
            )
        self.target: Target | None = (
            None if opts.dry_run else make_target(cfg, self._on_done, client_tag=TAG)
        )
        self.source = self._make_source()
        self._subscribed = False

    def _make_source(self) -> Source:
        src = self.cfg.source
        filters = list(dict.fromkeys(route.filter.text for route in self.routes))
        plan = plan_subscriptions(
            [(f, 1) for f in filters], src.limits.subscriptions_per_connection
        )
        base = f"{self.cfg.source_client_id(0)}-{TAG}"
        links = [
            SourceLink(
                i,
                endpoint_of(src),
                # A session of its own that ends with the connection: it queues nothing for
                # later, and a new subscription is what makes the broker send the retained
                # messages.
                replace(
                    clean_session(self.cfg, "source", base if i == 0 else f"{base}-{i}"),
                    receive_maximum=min(self.cfg.flow.max_inflight, src.limits.inflight or 65535),
                ),
                subscriptions,
                src.limits.filters_per_subscribe,
                src.limits.connect_interval,
                self.flow,
                self._handle,
                src.connect_timeout,
                self._stats,
            )
            for i, subscriptions in enumerate(plan)
        ]
        return Source(links, self.flow)

    # ---- the flow ------------------------------------------------------------------

    def _handle(self, acks: AckQueue, msg: Publish) -> bool:
        size = len(msg.payload)
        if not self.flow.try_admit(size):
            return False  # held: the connection stops reading until there is room
        pending = acks.admit(msg.packet_id, msg.qos, size, 0)
        s = self.summary
        if not msg.retain:
            s.live += 1
            pending.finish()
            return True
        s.topics += 1
        s.bytes += size
        s.deletes += not size
        props = msg.properties
        user = props.get(codec.USER_PROPERTY) if props else None
        if user and any(key == HOP_MARKER for key, _ in user):
            s.skipped["loop"] += 1  # put there by a bridge: carrying it back would loop
            pending.finish()
            return True
        found = self._match(msg.topic)
        if found is None:  # overlapping filters of another route: not ours to carry
            s.skipped["route"] += 1
            pending.finish()
            return True
        route, target_topic = found
        pending.route = route.index
        if route.gate is not None and not route.gate.admits(msg.topic):
            s.skipped["cohort"] += 1
            pending.finish()
            return True
        env = self._envelope(msg, pending, target_topic, route)
        problem = self._limits.violation(env.topic, size)
        if problem is not None:
            self._dead_letter(env, problem)
            return True
        if self.archive is not None:
            if self.archive.required:
                pending.holds += 1
                self.archive.add(ARCHIVE, self._record(env), pending.finish)
            else:
                self.archive.add(ARCHIVE, self._record(env), None)
        if self.target is None:
            s.published += 1  # dry run: everything it would take to publish was checked
            pending.finish()
        else:
            self.target.submit(env)
        return True

    def _match(self, topic: str) -> tuple[CompiledRoute, str] | None:
        for route in self.routes:
            captures = route.filter.captures(topic)
            if captures is not None:
                return route, route.template.render(topic, captures)
        return None

    def _envelope(
        self, msg: Publish, pending: Pending, target_topic: str, route: CompiledRoute
    ) -> Envelope:
        # The live flow's properties (pipeline.Bridge._envelope): passed through, plus the
        # hop marker; the expiry is forwarded as what remains.
        now = self._loop.time()
        expires_at = None
        out: codec.Properties | None = None
        if self._v5:
            props = msg.properties or {}
            out = {key: props[key] for key in PASSTHROUGH if key in props}
            expiry = props.get(codec.MESSAGE_EXPIRY)
            if expiry is not None:
                expires_at = now + expiry
            out[codec.USER_PROPERTY] = [*props.get(codec.USER_PROPERTY, []), self._marker]
        return Envelope(
            source_topic=msg.topic, topic=target_topic.encode(), payload=msg.payload, qos=1,
            retain=True, properties=out, received_at=now, expires_at=expires_at,
            route=route.index, pending=pending, source=msg, received_epoch=time.time(),
        )  # fmt: skip

    def _record(self, env: Envelope) -> dict[str, Any]:
        label = self.cfg.routes[env.route].label
        instance = f"{self.cfg.instance_id}-{TAG}"
        return archive_format.record(env, self.cfg.direction, instance, label)

    def _on_done(self, env: Envelope, outcome: Outcome) -> None:
        if outcome is DELIVERED:
            self.summary.published += 1
            env.pending.finish()
        elif outcome is EXPIRED:
            self.summary.skipped["expired"] += 1
            env.pending.finish()
        else:
            self._dead_letter(env, outcome.dead_letter_reason(POISON_DROPS)[0])

    def _dead_letter(self, env: Envelope, reason: str) -> None:
        self.summary.dead_lettered += 1
        self._dead_letters.submit(env, reason, env.pending.finish)

    # ---- the run -------------------------------------------------------------------

    async def run(self) -> SyncSummary:
        try:
            async with asyncio.timeout(self.opts.timeout):
                await self._run()
        except TimeoutError:
            if not self._subscribed:
                problem = "the source subscription did not succeed (see the log)"
            else:
                problem = f"{self.flow.messages} messages still in flight (target reachable?)"
            self.summary.errors.append(
                f"not done within --timeout {self.opts.timeout:g} s: {problem}"
            )
        return self.summary

    async def _run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self.archive is not None:
                await stack.enter_async_context(self.archive)
            if self.target is not None:
                await stack.enter_async_context(self.target)
                stack.push_async_callback(self._close_target)
            await stack.enter_async_context(self.source)
            stack.push_async_callback(self._close_source)
            while not self.source.subscribed:  # noqa: ASYNC110 - the links own the connection
                await asyncio.sleep(0.05)
            self._subscribed = True
            subscribed_at = self._loop.time()
            await self._until_idle(subscribed_at, self.opts.quiet)
            await self.source.begin_leave("end")
            # What the broker sent before the UNSUBACK still comes: finish it too.
            await self._until_idle(self._loop.time(), 0.2)
            if self.archive is not None:
                self.archive.seal_all()
                await self.archive.flush()
                if self.archive.pending:
                    self.summary.errors.append("archive: records not written to S3")

    async def _until_idle(self, since: float, quiet: float) -> None:
        """Until nothing is in flight and nothing arrived for ``quiet`` seconds."""
        while True:
            now = self._loop.time()
            idle = now - max(self.source.last_received, since) >= quiet
            if idle and self.flow.messages == 0:
                return
            if self.archive is not None and self.archive.required and idle:
                self.archive.seal_all()  # holds wait for their objects: write them now
            await asyncio.sleep(0.05)

    async def _close_target(self) -> None:
        assert self.target is not None
        await asyncio.shield(self.target.close())

    async def _close_source(self) -> None:
        self.source.stop_reading()
        await asyncio.shield(
            self.source.close(self.source.exits(True, self.cfg.source.protocol == "5"))
        )
