"""Prometheus exposition of the bridge's counters, read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from bridge.reasons import DISCONNECT_REASONS, PROTOCOL_ERROR_REASONS, THROTTLE_REASONS
from bridge.stats import LATENCY_BUCKETS, Stats

if TYPE_CHECKING:
    from bridge.archive import S3Archive
    from bridge.link import LinkStats
    from bridge.release import Releasable


@dataclass(slots=True)
class Probe:
    """What the collector reads from a running bridge."""

    direction: str
    instance: str
    stats: Stats
    flow: Flow
    sources: Callable[[], list[LinkStats]]
    targets: Callable[[], list[LinkStats]]
    ready: Callable[[], bool]
    archive: S3Archive | None = None
    loop_lag: Callable[[], float] = lambda: 0.0
    releases: Callable[[], list[Releasable]] = list
    adoptions: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (done, unfinished)
    # (route label, percent) of the routes with a cohort, as the last reload left them.
    cohorts: Callable[[], list[tuple[str, float]]] = list
    clock: Callable[[], float] = time.monotonic  # the clock of Pending and Stats times
    # Families of other concepts (heartbeat, failover), each given the direction label.
    extra: Sequence[Callable[[str], Iterable[Metric]]] = ()


def by_reason(
    family: CounterMetricFamily,
    labels: list[str],
    known: Iterable[str],
    seen: Mapping[str, int],
) -> None:
    """One sample per reason: the known ones at 0 from the start (``reasons.py``), so an
    alert on ``increase()`` sees the first event, then any other reason seen."""
    for reason in dict.fromkeys([*known, *seen]):
        family.add_metric([*labels, reason], seen.get(reason, 0))


class BridgeCollector(Collector):
    def __init__(self, probe: Probe, target_v5: bool = True) -> None:
        self.probe = probe
        # An MQTT 3.1.1 server cannot send DISCONNECT: no such series to promise.
        self.disconnect_reasons = DISCONNECT_REASONS if target_v5 else ()
        # Probe times are the loop's clock; one offset to Unix time, taken once, keeps a
        # timestamp the same from scrape to scrape.
        self._epoch = time.time() - probe.clock()

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
            ("skipped", s.skipped, "Messages acknowledged, not forwarded: outside the cohort."),
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
        now = p.clock()
        oldest = [link.oldest for link in p.sources() if link.oldest is not None]
        gauges: tuple[tuple[str, float, str], ...] = (
            ("inflight_messages", p.flow.messages, "Messages received and not yet acknowledged."),
            ("inflight_bytes", p.flow.bytes, "Payload bytes received and not yet acknowledged."),
            ("inflight_messages_limit", p.flow.max_messages, "flow.max_inflight."),
            (
                "inflight_oldest_age_seconds",
                now - min(oldest) if oldest else 0.0,
                "Age of the oldest message waiting for its source acknowledgement (0: none).",
            ),
            (
                "ready",
                int(p.ready()),
                "1 when /readyz is 200: subscribed, connected, and the heartbeat crosses.",
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
        reloads = CounterMetricFamily(
            "mqtt_bridge_reloads",
            "Configuration reloads (SIGHUP), by result: applied or refused.",
            labels=["direction", "result"],
        )
        for result, count in sorted(s.reloads.items()):
            reloads.add_metric([d, result], count)
        yield reloads
        percent = GaugeMetricFamily(
            "mqtt_bridge_cohort_percent",
            "The cohort's percent of devices on a copy route (include/exclude lists aside).",
            labels=["direction", "route"],
        )
        for label, share in p.cohorts():
            percent.add_metric([d, label], share)
        yield percent
        yield from self._routes(d)
        yield from self._connections(d)
        if p.archive is not None:
            yield from self._archive(d, p.archive)
        yield from self._membership(d)
        for more in p.extra:
            yield from more(d)
        info = GaugeMetricFamily(
            "mqtt_bridge_build_info",
            "Always 1. instance_id is the worker's own name (in Kubernetes `instance` is the "
            "pod's address): join on instance to show it.",
            labels=["direction", "instance_id", "version"],
        )
        info.add_metric([d, p.instance, __version__], 1)
        yield info

    def _routes(self, d: str) -> Iterator[Metric]:
        s = self.probe.stats
        inflight = GaugeMetricFamily(
            "mqtt_bridge_route_inflight_messages",
            "Messages of a route received and not yet acknowledged at the source.",
            labels=["direction", "route"],
        )
        last = GaugeMetricFamily(
            "mqtt_bridge_route_last_published_timestamp_seconds",
            "Unix time of the route's last message the target took (0: none yet); "
            "time() - this = seconds since.",
            labels=["direction", "route"],
        )
        for label, received, finished, at in zip(
            s.routes, s.received, s.finished, s.last_published, strict=True
        ):
            inflight.add_metric([d, label], received - finished)
            last.add_metric([d, label], at + self._epoch if at else 0.0)
        yield inflight
        yield last

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
        lost = CounterMetricFamily(
            "mqtt_bridge_source_sessions_lost",
            "Source reconnects that found no session: the broker dropped what it held for us.",
            labels=["direction", "connection"],
        )
        received = CounterMetricFamily(
            "mqtt_bridge_connection_received",
            "Messages a source connection took (source.connections share a group's traffic).",
            labels=["direction", "connection"],
        )
        protocol_errors = CounterMetricFamily(
            "mqtt_bridge_protocol_errors",
            "Connections we closed because the broker broke MQTT, by what it did.",
            labels=["direction", "side", "connection", "reason"],
        )
        for link in p.sources():
            state.add_metric([d, "source", str(link.index)], int(link.up))
            lost.add_metric([d, str(link.index)], link.sessions_lost)
            reconnects.add_metric([d, "source", str(link.index)], link.reconnects)
            received.add_metric([d, str(link.index)], link.received)
            by_reason(
                protocol_errors, [d, "source", str(link.index)], PROTOCOL_ERROR_REASONS,
                link.protocol_errors,
            )  # fmt: skip
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
            "mqtt_bridge_connection_rate_limit_messages_per_second",
            "Publishes per second a target connection may use now (0 = unpaced); drops on 0x97.",
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
            by_reason(throttled, [d, i], THROTTLE_REASONS, target.throttled)
            by_reason(disconnects, [d, i], self.disconnect_reasons, target.disconnects)
            by_reason(
                protocol_errors, [d, "target", i], PROTOCOL_ERROR_REASONS, target.protocol_errors
            )
        yield from (
            state,
            reconnects,
            received,
            published,
            window,
            rate,
            throttled,
            disconnects,
            lost,
            protocol_errors,
        )

    def _membership(self, d: str) -> Iterator[Metric]:
        released = GaugeMetricFamily(
            "mqtt_bridge_route_released",
            "1 while a route's share is given back because the target is down.",
            labels=["direction", "route"],
        )
        releases = CounterMetricFamily(
            "mqtt_bridge_route_releases",
            "Times a route gave its share back (release_when_target_down).",
            labels=["direction", "route"],
        )
        rejoins = CounterMetricFamily(
            "mqtt_bridge_route_rejoins",
            "Times a released route took its share again after a probe publish succeeded.",
            labels=["direction", "route"],
        )
        for route in self.probe.releases():
            released.add_metric([d, route.label], int(route.released))
            releases.add_metric([d, route.label], route.releases)
            rejoins.add_metric([d, route.label], route.rejoins)
        yield from (released, releases, rejoins)
        done, unfinished = self.probe.adoptions()
        adopted = CounterMetricFamily(
            "mqtt_bridge_adoptions",
            "Sessions of gone workers this worker drained and ended (membership).",
            labels=["direction", "result"],
        )
        adopted.add_metric([d, "done"], done)
        adopted.add_metric([d, "unfinished"], unfinished)
        yield adopted

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
            ("uploads_inflight", archive.uploads, "S3 uploads under way."),
        ):
            gauge = GaugeMetricFamily(f"mqtt_bridge_archive_{name}", doc, labels=["direction"])
            gauge.add_metric([d], gauge_value)
            yield gauge


def make_registry(probe: Probe, target_v5: bool = True) -> Callable[[], bytes]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(probe, target_v5))
    return lambda: generate_latest(registry)
