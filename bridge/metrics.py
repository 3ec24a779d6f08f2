"""Prometheus exposition of the bridge's counters, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.flow import Flow
from bridge.stats import LATENCY_BUCKETS, Stats

if TYPE_CHECKING:
    from bridge.archive import S3Archive
    from bridge.link import LinkStats


@dataclass(slots=True)
class Probe:
    """What the collector reads from a running bridge."""

    direction: str
    stats: Stats
    flow: Flow
    sources: Callable[[], list[LinkStats]]
    targets: Callable[[], list[LinkStats]]
    ready: Callable[[], bool]
    archive: S3Archive | None = None
    loop_lag: Callable[[], float] = lambda: 0.0


class BridgeCollector(Collector):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        p = self.probe
        d = p.direction
        s = p.stats

        def per_route(name: str, doc: str, values: list[int]) -> Metric:
            family = CounterMetricFamily(f"mqtt_bridge_{name}", doc, labels=["direction", "route"])
            for label, value in zip(s.routes, values, strict=True):
                family.add_metric([d, label], value)
            return family

        yield per_route("received", "Messages received from the source.", s.received)
        latency = HistogramMetricFamily(
            "mqtt_bridge_e2e_latency_seconds",
            "Source receipt to target acknowledgement (QoS 1) or hand-off (QoS 0).",
            labels=["direction", "route"],
        )
        bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for label, per_bucket, total in zip(
            s.routes, s.latency_counts, s.latency_sums, strict=True
        ):
            cumulative, running = [], 0
            for bound, count in zip(bounds, per_bucket, strict=True):
                running += count
                cumulative.append((bound, running))
            latency.add_metric([d, label], cumulative, total)
        yield latency
        yield per_route(
            "published", "Messages the target acknowledged (QoS 1) or took (QoS 0).", s.published
        )
        for name, counts, doc in (
            ("dropped", s.dropped, "Messages dropped, by reason (never silently)."),
            ("dead_lettered", s.dead_lettered, "Messages sent to the dead-letter sink, by reason."),
        ):
            family = CounterMetricFamily(
                f"mqtt_bridge_{name}", doc, labels=["direction", "route", "reason"]
            )
            for (route, reason), value in sorted(counts.items()):
                family.add_metric([d, s.routes[route], reason], value)
            yield family
        acked = CounterMetricFamily(
            "mqtt_bridge_acknowledged", "Source messages finished in order.", labels=["direction"]
        )
        acked.add_metric([d], s.acknowledged)
        yield acked
        abandoned = CounterMetricFamily(
            "mqtt_bridge_abandoned",
            "Messages finished after their source connection was lost (the broker redelivers).",
            labels=["direction"],
        )
        abandoned.add_metric([d], s.abandoned)
        yield abandoned
        gauges: tuple[tuple[str, float, str], ...] = (
            ("inflight_messages", p.flow.messages, "Messages received and not yet acknowledged."),
            ("inflight_bytes", p.flow.bytes, "Payload bytes received and not yet acknowledged."),
            ("inflight_messages_peak", p.flow.peak_messages, "Highest inflight_messages so far."),
            ("inflight_bytes_peak", p.flow.peak_bytes, "Highest inflight_bytes so far."),
            ("inflight_messages_limit", p.flow.max_messages, "flow.max_inflight."),
            (
                "ready",
                int(p.ready()),
                "1 when subscribed at the source and connected to the target.",
            ),
            (
                "event_loop_lag_seconds",
                p.loop_lag(),
                "How late the event loop's heartbeat woke up.",
            ),
        )
        for name, reading, doc in gauges:
            gauge = GaugeMetricFamily(f"mqtt_bridge_{name}", doc, labels=["direction"])
            gauge.add_metric([d], reading)
            yield gauge
        yield from self._connections(d)
        if p.archive is not None:
            yield from self._archive(d, p.archive)
        info = GaugeMetricFamily("mqtt_bridge_build_info", "Build information.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _connections(self, d: str) -> Iterator[Metric]:
        p = self.probe
        state = GaugeMetricFamily(
            "mqtt_bridge_connected",
            "1 when the connection is up (source: subscribed).",
            labels=["direction", "side", "connection"],
        )
        reconnects = CounterMetricFamily(
            "mqtt_bridge_reconnects",
            "Connections lost and re-established.",
            labels=["direction", "side", "connection"],
        )
        protocol_errors = CounterMetricFamily(
            "mqtt_bridge_protocol_errors",
            "Connections we closed because the broker broke MQTT, by what it did.",
            labels=["direction", "side", "connection", "reason"],
        )
        for link in p.sources():
            state.add_metric([d, "source", str(link.index)], int(link.up))
            reconnects.add_metric([d, "source", str(link.index)], link.reconnects)
            for reason, count in link.protocol_errors.items():
                protocol_errors.add_metric([d, "source", str(link.index), reason], count)
        published = CounterMetricFamily(
            "mqtt_bridge_connection_published",
            "Messages a target connection got acknowledged.",
            labels=["direction", "connection"],
        )
        window = GaugeMetricFamily(
            "mqtt_bridge_connection_window",
            "In-flight window of a target connection (shrinks on 0x93, and on 0x97 when unpaced).",
            labels=["direction", "connection"],
        )
        rate = GaugeMetricFamily(
            "mqtt_bridge_connection_rate_limit",
            "Publish rate a target connection may use now (0 = unpaced); drops on 0x97.",
            labels=["direction", "connection"],
        )
        throttled = CounterMetricFamily(
            "mqtt_bridge_throttled",
            "Quota-exceeded answers (0x97) from the target.",
            labels=["direction", "connection", "reason"],
        )
        disconnects = CounterMetricFamily(
            "mqtt_bridge_disconnects",
            "DISCONNECTs from the target by reason (session_taken_over: a client id collision).",
            labels=["direction", "connection", "reason"],
        )
        for target in p.targets():
            i = str(target.index)
            state.add_metric([d, "target", i], int(target.up))
            reconnects.add_metric([d, "target", i], target.reconnects)
            published.add_metric([d, i], target.published)
            window.add_metric([d, i], target.window)
            rate.add_metric([d, i], target.rate_limit)
            for reason, count in target.throttled.items():
                throttled.add_metric([d, i, reason], count)
            for reason, count in target.disconnects.items():
                disconnects.add_metric([d, i, reason], count)
            for reason, count in target.protocol_errors.items():
                protocol_errors.add_metric([d, "target", i, reason], count)
        yield from (state, reconnects, published, window, rate, throttled, disconnects)
        yield protocol_errors

    @staticmethod
    def _archive(d: str, archive: S3Archive) -> Iterator[Metric]:
        for name, value, doc in (
            ("batches", archive.batches, "Archive objects written to S3."),
            ("bytes", archive.bytes, "Compressed bytes written to S3."),
            ("records", archive.records, "Records (messages) written to S3."),
            ("failures", archive.failures, "Failed S3 writes (each is retried)."),
            (
                "dropped",
                archive.dropped,
                "Records dropped: best_effort buffer over max_buffer_bytes.",
            ),
        ):
            family = CounterMetricFamily(f"mqtt_bridge_archive_{name}", doc, labels=["direction"])
            family.add_metric([d], value)
            yield family
        for name, gauge_value, doc in (
            ("lag_seconds", archive.lag, "Age of the oldest record not yet in S3."),
            ("buffered_bytes", archive.buffered, "Record bytes waiting for S3."),
        ):
            gauge = GaugeMetricFamily(f"mqtt_bridge_archive_{name}", doc, labels=["direction"])
            gauge.add_metric([d], gauge_value)
            yield gauge


def make_registry(probe: Probe) -> Callable[[], bytes]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(probe))
    return lambda: generate_latest(registry)
