"""The bridge: source → bounded flow → target connections → in-order source ack.

Everything on the hot path is a synchronous callback: a PUBLISH is parsed, routed,
admitted and queued for its target connection within one ``data_received`` call, and
the target's PUBACK releases the source acknowledgement in the same way. No task is
created per message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from functools import partial
from typing import Any

import orjson
import structlog

from bridge import mqtt_codec as codec
from bridge.backup import ARCHIVE, ArchiveSettings, S3Archive, properties_to_json
from bridge.config import HOP_MARKER, BridgeConfig, BrokerConfig
from bridge.deadletter import ArchiveDeadLetters, DeadLetterSink, LogDeadLetters
from bridge.flow import AckQueue, Flow
from bridge.http import HttpServer
from bridge.message import Envelope, Pending
from bridge.metrics import Probe, make_registry
from bridge.mqtt import Endpoint, SessionOptions
from bridge.mqtt_codec import Publish
from bridge.pool import (
    DELIVERED,
    EXPIRED,
    POISON,
    POISON_DROPS,
    TOO_LARGE,
    UNENCODABLE,
    OnDone,
    Pacing,
    TargetLink,
    TargetPool,
)
from bridge.routing import TopicFilter, TopicTemplate
from bridge.source import Source, SourceLink, plan_subscriptions
from bridge.stats import Stats
from bridge.watchdog import Watchdog

# MQTT 5 properties a republished message keeps. Topic alias and subscription
# identifiers belong to one connection; the expiry is rewritten as what remains.
_PASSTHROUGH = (
    codec.PAYLOAD_FORMAT,
    codec.CONTENT_TYPE,
    codec.RESPONSE_TOPIC,
    codec.CORRELATION_DATA,
)


def protocol_level(broker: BrokerConfig) -> int:
    return codec.PROTOCOL_5 if broker.protocol == "5" else codec.PROTOCOL_311


def endpoint_of(broker: BrokerConfig) -> Endpoint:
    return Endpoint(broker.host, broker.port, broker.ssl_context(), broker.server_name)


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
        self.archive: S3Archive | None = None
        s3 = cfg.backup.s3
        if s3 is not None:
            self.archive = S3Archive(
                ArchiveSettings(
                    s3.bucket,
                    s3.prefix,
                    s3.endpoint_url,
                    s3.region,
                    s3.mode == "required",
                    s3.flush_interval,
                    s3.max_batch_bytes,
                    s3.max_buffer_bytes,
                ),
                cfg.direction,
                cfg.instance_id,
            )
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
        self.source = self._make_source(cfg)
        self.pool = make_pool(cfg, self._on_done)
        self.watchdog = Watchdog()
        self._stack = contextlib.AsyncExitStack()

    def _make_source(self, cfg: BridgeConfig) -> Source:
        src = cfg.source
        endpoint = endpoint_of(src)
        plan = plan_subscriptions(
            [(r.subscription, r.qos) for r in cfg.routes], src.limits.subscriptions_per_connection
        )
        links = [
            SourceLink(
                i,
                endpoint,
                SessionOptions(
                    client_id=cfg.source_client_id(i),
                    protocol=protocol_level(src),
                    clean_start=False,
                    session_expiry=src.session_expiry,
                    keepalive=src.keepalive,
                    # MQTT 5 lets us tell the broker our window: it stops sending at the cap.
                    receive_maximum=min(cfg.flow.max_inflight, src.limits.inflight or 65535),
                    username=src.username,
                    password=_password(src),
                ),
                subscriptions,
                src.limits.filters_per_subscribe,
                src.limits.connect_interval,
                self.flow,
                self._handle,
                src.connect_timeout,
                self.stats,
            )
            for i, subscriptions in enumerate(plan)
        ]
        return Source(links, self.flow)

    # ---- hot path ------------------------------------------------------------------

    def _handle(self, acks: AckQueue, msg: Publish) -> bool:
        size = len(msg.payload)
        if not self.flow.try_admit(size):
            if msg.qos == 0:
                route = self._match(msg.topic)
                self.stats.dropped[(route[0].index if route else 0, "full")] += 1
                return True
            return False  # held by the connection, which stops reading
        found = self._match(msg.topic)
        route_index = found[0].index if found else 0
        pending = Pending(acks, msg.packet_id, msg.qos, size, route_index)
        acks.add(pending)
        self.stats.received[route_index] += 1
        props = msg.properties
        if props is not None and self._has_marker(props):
            self.stats.dropped[(route_index, "loop")] += 1
            acks.complete(pending)
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
                archive.add(ARCHIVE, self._record(env), partial(pending.acks.complete, pending))
            else:
                archive.add(ARCHIVE, self._record(env), None)
        self.pool.submit(env)
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
        """The archive record of a message: what the source sent, and where it went."""
        msg = env.source
        return {
            "topic": msg.topic,
            "target_topic": env.topic.decode(),
            "payload_b64": base64.b64encode(msg.payload).decode(),
            "qos": msg.qos,
            "retain": msg.retain,
            "properties": properties_to_json(msg.properties),
            "received_at": env.received_epoch,
            "direction": self.cfg.direction,
            "instance": self.cfg.instance_id,
            "route": self.routes[env.route].label,
        }

    def _on_done(self, env: Envelope, outcome: int) -> None:
        pending = env.pending
        if outcome == DELIVERED:
            self.stats.published[pending.route] += 1
            self.stats.observe_latency(pending.route, self._loop.time() - env.received_at)
            pending.acks.complete(pending)
        elif outcome == EXPIRED:
            self.stats.dropped[(pending.route, "expired")] += 1
            pending.acks.complete(pending)
        elif outcome == POISON:
            reason = f"target dropped the connection {POISON_DROPS} times on this message"
            self._dead_letter(env, reason, "connection_dropped")
        elif outcome == TOO_LARGE:
            self._dead_letter(
                env, "larger than the target's Maximum Packet Size", "packet_too_large"
            )
        elif outcome == UNENCODABLE:
            self._dead_letter(env, "cannot be encoded as an MQTT packet", "unencodable")
        else:
            self._dead_letter(
                env,
                f"rejected: {codec.reason_name(outcome)} (0x{outcome:02x})",
                f"rejected_0x{outcome:02x}",
            )

    def _dead_letter(self, env: Envelope, reason: str, label: str | None = None) -> None:
        pending = env.pending
        self.stats.dead_lettered[(pending.route, label or reason.split(" (", 1)[0])] += 1
        self.dead_letters.submit(env, reason, lambda: pending.acks.complete(pending))

    # ---- lifecycle -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.source.subscribed and self.pool.connected

    async def __aenter__(self) -> Bridge:
        await self._stack.__aenter__()
        await self._stack.enter_async_context(self.watchdog)
        listen = self.cfg.http.host_port
        if listen is not None:
            probe = Probe(
                direction=self.cfg.direction,
                stats=self.stats,
                flow=self.flow,
                sources=self.source.links,
                targets=self.pool.links,
                ready=lambda: self.ready,
                archive=self.archive,
                loop_lag=lambda: self.watchdog.lag,
            )
            metrics = make_registry(probe)
            await self._stack.enter_async_context(
                HttpServer(
                    listen[0],
                    listen[1],
                    {
                        "/metrics": lambda: (200, "text/plain; version=0.0.4", metrics()),
                        "/healthz": self._healthz,
                        "/readyz": self._readyz,
                    },
                )
            )
        if self.archive is not None:
            await self._stack.enter_async_context(self.archive)
        # Targets first: a source message must find a connection to go to.
        await self._stack.enter_async_context(self.pool)
        await self._stack.enter_async_context(self.source)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.__aexit__(None, None, None)

    def _healthz(self) -> tuple[int, str, bytes]:
        if self.watchdog.healthy:
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"event loop stalled\n"

    def _readyz(self) -> tuple[int, str, bytes]:
        body = orjson.dumps(
            {
                "ready": self.ready,
                "source_subscribed": self.source.subscribed,
                "target_connected": [link.connected for link in self.pool.links],
            }
        )
        return (200 if self.ready else 503), "application/json", body + b"\n"

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
        await asyncio.shield(self.pool.close())
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


def make_pool(cfg: BridgeConfig, on_done: OnDone, client_tag: str = "tgt") -> TargetPool:
    """The target connections of ``cfg``: paced, windowed, one client id each."""
    tgt = cfg.target
    endpoint = endpoint_of(tgt)
    limits = tgt.limits
    pacing = Pacing(limits.publish_rate, limits.bytes_rate, limits.burst, limits.connect_interval)
    base = (
        tgt.client_id
        if tgt.client_id and client_tag == "tgt"
        else f"{cfg.instance_id}-{client_tag}"
    )
    return TargetPool(
        [
            TargetLink(
                i,
                endpoint,
                SessionOptions(
                    client_id=f"{base}-{i}",
                    protocol=protocol_level(tgt),
                    # The bridge retransmits what was in flight itself; a stored
                    # session on the target would only add a second copy.
                    clean_start=True,
                    session_expiry=tgt.session_expiry,
                    keepalive=tgt.keepalive,
                    username=tgt.username,
                    password=_password(tgt),
                ),
                window=min(cfg.flow.max_inflight, limits.inflight or 65535),
                connect_timeout=tgt.connect_timeout,
                pacing=pacing,
                on_done=on_done,
            )
            for i in range(tgt.connections)
        ]
    )


def _password(broker: BrokerConfig) -> bytes | None:
    secret = broker.password
    return secret.get_secret_value().encode() if secret is not None else None
