"""From configuration to connections: endpoints, session options and the links of each
side. Each derivation exists once; the worker (``pipeline``) and ``replay`` both use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from bridge import mqtt_codec as codec
from bridge.archive import ArchiveSettings, S3Archive
from bridge.config import BridgeConfig, BrokerConfig, url_host, url_port
from bridge.failover import Failback, Failover
from bridge.flow import Flow
from bridge.heartbeat import Heartbeat, Publisher, Reader, Topics
from bridge.link import ConnectionFactory
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.pacing import Pacing
from bridge.source import Handler, Source, SourceLink
from bridge.stats import Stats
from bridge.target import OnDone, TargetLink, TargetPool


def protocol_level(broker: BrokerConfig) -> int:
    return codec.PROTOCOL_5 if broker.protocol == "5" else codec.PROTOCOL_311


def endpoints_of(broker: BrokerConfig) -> list[Endpoint]:
    """``url`` and then ``failover_urls``; every one with the section's TLS settings."""
    context = broker.ssl_context()
    return [
        Endpoint(url_host(url), url_port(url), context, broker.server_name_of(url))
        for url in broker.urls
    ]


def make_failover(side: Literal["source", "target"], broker: BrokerConfig) -> Failover:
    """The endpoint policy one side's links share (one endpoint without failover_urls)."""
    return Failover(side, endpoints_of(broker), broker.failover_after, broker.failback_after)


def make_failback(
    cfg: BridgeConfig,
    failover: Failover,
    factory: ConnectionFactory = MqttConnection,
) -> Failback:
    """Probes the primary of ``failover``'s side under a client id of its own."""
    side: Literal["source", "target"] = "source" if failover.side == "source" else "target"
    broker: BrokerConfig = cfg.source if side == "source" else cfg.target
    options = SessionOptions(
        client_id=cfg.side_client_id(side, "probe"),
        protocol=protocol_level(broker),
        clean_start=True,  # leaves no session behind
        keepalive=broker.keepalive,
        username=broker.username,
        password=password_of(broker),
    )
    return Failback(failover, options, broker.connect_timeout, factory)


def password_of(broker: BrokerConfig) -> bytes | None:
    secret = broker.password
    return secret.get_secret_value().encode() if secret is not None else None


def make_target(
    cfg: BridgeConfig,
    on_done: OnDone,
    client_tag: str = "tgt",
    factory: ConnectionFactory = MqttConnection,
    failover: Failover | None = None,
) -> TargetPool:
    """The target connections of ``cfg``: paced, windowed, one client id each."""
    tgt = cfg.target
    failover = failover or make_failover("target", tgt)
    endpoint = failover.endpoints[0]
    limits = tgt.limits
    pacing = Pacing(limits.publish_rate, limits.bytes_rate, limits.burst, limits.connect_interval)
    return TargetPool(
        [
            TargetLink(
                i,
                endpoint,
                SessionOptions(
                    client_id=cfg.target_client_id(i, client_tag),
                    protocol=protocol_level(tgt),
                    # The bridge retransmits what was in flight itself; a stored
                    # session on the target would only add a second copy.
                    clean_start=True,
                    session_expiry=tgt.session_expiry,
                    keepalive=tgt.keepalive,
                    username=tgt.username,
                    password=password_of(tgt),
                ),
                window=min(cfg.flow.max_inflight, limits.inflight or 65535),
                connect_timeout=tgt.connect_timeout,
                pacing=pacing,
                on_done=on_done,
                factory=factory,
                failover=failover,
            )
            for i in range(tgt.connections)
        ]
    )


def make_source(
    cfg: BridgeConfig,
    flow: Flow,
    handler: Handler,
    stats: Stats,
    factory: ConnectionFactory = MqttConnection,
    failover: Failover | None = None,
) -> Source:
    """The source connections of ``cfg``: persistent sessions, one per subscription batch
    (``source.connections`` sets of them)."""
    src = cfg.source
    failover = failover or make_failover("source", src)
    endpoint = failover.endpoints[0]
    topics = cfg.heartbeat_topics()
    optional = frozenset(topics[:1] if topics else ())
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
                password=password_of(src),
            ),
            subscriptions,
            src.limits.filters_per_subscribe,
            src.limits.connect_interval,
            flow,
            handler,
            src.connect_timeout,
            stats,
            factory,
            failover,
            optional,
        )
        for i, subscriptions in enumerate(cfg.source_plan())
    ]
    return Source(links, flow)


# What a heartbeat link is built from: endpoint, options, connect timeout and interval,
# connection factory, and the side's failover.
_LinkArgs = tuple[Endpoint, SessionOptions, float, float, ConnectionFactory, Failover]


def make_heartbeat(
    cfg: BridgeConfig,
    source: Failover,
    target: Failover,
    source_up: Callable[[], bool],
    target_up: Callable[[], bool],
    factory: ConnectionFactory = MqttConnection,
) -> Heartbeat | None:
    """The heartbeat of ``cfg`` (None when disabled): a publisher on the source and a reader
    on the target, each following its side's failover and starting once that side is up."""
    topics = cfg.heartbeat_topics()
    if topics is None:
        return None
    heartbeat = Heartbeat(
        Topics(*topics),
        cfg.heartbeat.interval,
        cfg.heartbeat.stale_after,
        cfg.direction,
        cfg.instance_id,
    )

    def link_args(side: Literal["source", "target"], failover: Failover) -> _LinkArgs:
        broker: BrokerConfig = cfg.source if side == "source" else cfg.target
        options = SessionOptions(
            client_id=cfg.side_client_id(side, "hb"),
            protocol=protocol_level(broker),
            clean_start=True,  # only live heartbeats matter
            keepalive=broker.keepalive,
            username=broker.username,
            password=password_of(broker),
        )
        return (
            failover.endpoints[0],
            options,
            broker.connect_timeout,
            broker.limits.connect_interval,
            factory,
            failover,
        )

    heartbeat.attach(
        Publisher(heartbeat, *link_args("source", source)),
        Reader(heartbeat, *link_args("target", target)),
        source_up,
        target_up,
    )
    return heartbeat


def make_archive(cfg: BridgeConfig) -> S3Archive | None:
    """The S3 archive of ``cfg``, or None without ``backup.s3``."""
    s3 = cfg.backup.s3
    if s3 is None:
        return None
    return S3Archive(
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
