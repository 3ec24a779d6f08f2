"""From configuration to connections: endpoints, session options and the links of each
side. Each derivation exists once; the worker (``pipeline``) and ``replay`` both use it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from bridge import mqtt_codec as codec
from bridge.archive import ArchiveSettings, S3Archive
from bridge.config import HOP_MARKER, BridgeConfig, BrokerConfig, url_host, url_port
from bridge.failover import Failback, Failover
from bridge.flow import Flow
from bridge.heartbeat import Heartbeat, Publisher, Reader, Topics
from bridge.link import ConnectionFactory
from bridge.membership import Adopt, Registry, settings_of
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.pacing import Pacing, Ticker, tick_for
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


def clean_session(
    cfg: BridgeConfig, side: Literal["source", "target"], client_id: str
) -> SessionOptions:
    """A connection of the bridge's own (probe, heartbeat, registry, a tool): clean start,
    so it leaves no session behind; the side's credentials and keepalive, and the
    Maximum Packet Size that bounds what its broker may send us (every connection
    reads, so every connection announces it)."""
    broker = cfg.broker(side)
    return SessionOptions(
        client_id=client_id,
        protocol=protocol_level(broker),
        clean_start=True,
        keepalive=broker.keepalive,
        username=broker.username,
        password=password_of(broker),
        maximum_packet_size=cfg.packet_limit(side),
    )


def endpoint_of(broker: BrokerConfig) -> Endpoint:
    """The primary endpoint (``url``): for one-shot tools that do not fail over."""
    return endpoints_of(broker)[0]


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
    broker = cfg.broker(side)
    options = clean_session(cfg, side, cfg.side_client_id(side, "probe"))
    return Failback(failover, options, broker.connect_timeout, factory)


def password_of(broker: BrokerConfig) -> bytes | None:
    secret = broker.password
    if secret is None:
        return None
    return secret.get_secret_value().encode("utf-8", "surrogateescape")  # the file's bytes


def probe_of(cfg: BridgeConfig) -> tuple[bytes, codec.Properties | None]:
    """The probe/canary publish on the target: topic and properties (the hop marker)."""
    topic = cfg.target.probe_topic.replace("{instance_id}", cfg.instance_id)
    props = {codec.USER_PROPERTY: [(HOP_MARKER, cfg.instance_id)]}
    return topic.encode(), props if cfg.target.protocol == "5" else None


def make_target(
    cfg: BridgeConfig,
    on_done: OnDone,
    client_tag: str = "tgt",
    factory: ConnectionFactory = MqttConnection,
    failover: Failover | None = None,
    needed_qos: int | None = None,
    connect_tries: int | None = None,
) -> TargetPool:
    """The target connections of ``cfg``: paced, windowed, one client id each.

    ``needed_qos``: the highest QoS that will be published (default: the routes');
    ``connect_tries``: give up after this many failed connects in a row (replay)."""
    tgt = cfg.target
    failover = failover or make_failover("target", tgt)
    endpoint = failover.endpoints[0]
    limits = tgt.limits
    pacing = Pacing(limits.publish_rate, limits.bytes_rate, limits.burst, limits.connect_interval)
    ticker = Ticker(tick_for(pacing))  # one pacing timer for the whole pool
    return TargetPool(
        [
            TargetLink(
                i,
                endpoint,
                # The bridge retransmits what was in flight itself; a stored session on
                # the target would only add a second copy: clean start.
                replace(
                    clean_session(cfg, "target", cfg.target_client_id(i, client_tag)),
                    session_expiry=tgt.session_expiry,
                ),
                window=min(cfg.flow.max_inflight, limits.inflight or 65535),
                connect_timeout=tgt.connect_timeout,
                pacing=pacing,
                on_done=on_done,
                factory=factory,
                canary=probe_of(cfg),
                failover=failover,
                needed_qos=max(r.qos for r in cfg.routes) if needed_qos is None else needed_qos,
                connect_tries=connect_tries,
                ticker=ticker,
            )
            for i in range(tgt.connections)
        ]
    )


def source_session(cfg: BridgeConfig, client_id: str, registry: Registry | None) -> SessionOptions:
    """A persistent source session; with a registry, its Will declares it gone."""
    src = cfg.source
    return replace(
        clean_session(cfg, "source", client_id),
        clean_start=False,
        session_expiry=src.session_expiry,
        # MQTT 5 lets us tell the broker our window: it stops sending at the cap.
        receive_maximum=min(cfg.flow.max_inflight, src.limits.inflight or 65535),
        will=registry.will(client_id) if registry is not None else None,
    )


def make_source(
    cfg: BridgeConfig,
    flow: Flow,
    handler: Handler,
    stats: Stats,
    registry: Registry | None = None,
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
            source_session(cfg, cfg.source_client_id(i), registry),
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
        broker = cfg.broker(side)
        options = clean_session(cfg, side, cfg.side_client_id(side, "hb"))  # only live ones matter
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


def make_archive(
    cfg: BridgeConfig, flow: Flow | None = None, instance: str | None = None
) -> S3Archive | None:
    """The S3 archive of ``cfg``, or None without ``backup.s3``. In `required` mode it
    writes a batch early when it holds its share of the flow, or when ``flow`` fills.
    ``instance`` names the objects of another tool (sync-retained), so they never collide
    with the worker's."""
    s3 = cfg.backup.s3
    if s3 is None:
        return None
    required = s3.mode == "required"
    archive = S3Archive(
        ArchiveSettings(
            s3.bucket,
            s3.prefix,
            s3.endpoint_url,
            s3.region,
            required,
            s3.flush_interval,
            s3.max_batch_bytes,
            s3.max_buffer_bytes,
            s3.max_uploads,
            cfg.flow.max_inflight if required else None,
        ),
        cfg.direction,
        instance or cfg.instance_id,
    )
    if flow is not None:
        # Dead letters hold acknowledgements in both modes: their batch goes early too.
        flow.on_full(archive.seal_held)
    return archive


def make_adopter(
    cfg: BridgeConfig,
    client_id: str,
    flow: Flow,
    handler: Handler,
    stats: Stats,
    factory: ConnectionFactory = MqttConnection,
    failover: Failover | None = None,
) -> SourceLink:
    """A one-shot source link that drains the session ``client_id`` left behind."""
    src = cfg.source
    filters: list[tuple[str, int]] = [(r.subscription, r.qos) for r in cfg.routes]
    return SourceLink(
        -1,
        endpoint_of(src),
        source_session(cfg, client_id, None),
        filters,
        src.limits.filters_per_subscribe,
        0.0,
        flow,
        handler,
        src.connect_timeout,
        stats,
        factory,
        failover=failover,
    )


def make_members(
    cfg: BridgeConfig,
    adopt: Adopt,
    on_fatal: Callable[[str], None],
    factory: ConnectionFactory = MqttConnection,
    failover: Failover | None = None,
) -> Registry | None:
    """The member registry on the source broker, unless ``membership.enabled`` is off."""
    if not cfg.membership.enabled:
        return None
    src = cfg.source
    # Per process (no session to resume): two workers with one instance_id must both
    # stay connected here to see each other's records.
    options = clean_session(cfg, "source", f"{cfg.instance_id}-members-{secrets.token_hex(3)}")
    return Registry(
        settings_of(cfg),
        [cfg.source_client_id(i) for i in range(cfg.source_connections)],
        endpoint_of(src),
        options,
        src.connect_timeout,
        adopt,
        on_fatal,
        factory,
        failover,
    )
