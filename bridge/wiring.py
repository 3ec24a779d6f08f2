"""From configuration to connections: endpoints, session options and the links of each
side. Each derivation exists once; the worker (``pipeline``) and ``replay`` both use it.
"""

from __future__ import annotations

from bridge import mqtt_codec as codec
from bridge.archive import ArchiveSettings, S3Archive
from bridge.config import BridgeConfig, BrokerConfig
from bridge.flow import Flow
from bridge.link import ConnectionFactory
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.pacing import Pacing
from bridge.source import Handler, Source, SourceLink
from bridge.stats import Stats
from bridge.target import OnDone, TargetLink, TargetPool


def protocol_level(broker: BrokerConfig) -> int:
    return codec.PROTOCOL_5 if broker.protocol == "5" else codec.PROTOCOL_311


def endpoint_of(broker: BrokerConfig) -> Endpoint:
    return Endpoint(broker.host, broker.port, broker.ssl_context(), broker.server_name)


def password_of(broker: BrokerConfig) -> bytes | None:
    secret = broker.password
    if secret is None:
        return None
    return secret.get_secret_value().encode("utf-8", "surrogateescape")  # the file's bytes


def make_target(
    cfg: BridgeConfig,
    on_done: OnDone,
    client_tag: str = "tgt",
    factory: ConnectionFactory = MqttConnection,
    needed_qos: int | None = None,
    connect_tries: int | None = None,
) -> TargetPool:
    """The target connections of ``cfg``: paced, windowed, one client id each.

    ``needed_qos``: the highest QoS that will be published (default: the routes');
    ``connect_tries``: give up after this many failed connects in a row (replay)."""
    tgt = cfg.target
    endpoint = endpoint_of(tgt)
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
                    maximum_packet_size=cfg.packet_limit("target"),
                ),
                window=min(cfg.flow.max_inflight, limits.inflight or 65535),
                connect_timeout=tgt.connect_timeout,
                pacing=pacing,
                on_done=on_done,
                factory=factory,
                needed_qos=max(r.qos for r in cfg.routes) if needed_qos is None else needed_qos,
                connect_tries=connect_tries,
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
) -> Source:
    """The source connections of ``cfg``: persistent sessions, one per subscription batch."""
    src = cfg.source
    endpoint = endpoint_of(src)
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
                maximum_packet_size=cfg.packet_limit("source"),
            ),
            subscriptions,
            src.limits.filters_per_subscribe,
            src.limits.connect_interval,
            flow,
            handler,
            src.connect_timeout,
            stats,
            factory,
        )
        for i, subscriptions in enumerate(cfg.source_plan())
    ]
    return Source(links, flow)


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
