"""Prometheus exposition of the bridge's counters, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.flow import Flow
from bridge.stats import Stats


@dataclass(slots=True)
class Probe:
    """What the collector reads from a running bridge."""

    direction: str
    stats: Stats
    flow: Flow
    source_connected: Callable[[], bool]
    target_connected: Callable[[], list[bool]]
    reconnects: Callable[[], dict[str, int]]
    ready: Callable[[], bool]


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
        for name, value, doc in (
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
        ):
            gauge = GaugeMetricFamily(f"mqtt_bridge_{name}", doc, labels=["direction"])
            gauge.add_metric([d], value)
            yield gauge
        state = GaugeMetricFamily(
            "mqtt_bridge_connected",
            "1 when the connection is up.",
            labels=["direction", "side", "connection"],
        )
        state.add_metric([d, "source", "0"], int(p.source_connected()))
        for i, up in enumerate(p.target_connected()):
            state.add_metric([d, "target", str(i)], int(up))
        yield state
        reconnects = CounterMetricFamily(
            "mqtt_bridge_reconnects",
            "Connections lost and re-established.",
            labels=["direction", "side"],
        )
        for side, value in p.reconnects().items():
            reconnects.add_metric([d, side], value)
        yield reconnects
        info = GaugeMetricFamily("mqtt_bridge_build_info", "Build information.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def make_registry(probe: Probe) -> Callable[[], bytes]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(probe))
    return lambda: generate_latest(registry)
