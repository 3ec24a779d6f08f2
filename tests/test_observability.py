"""The operator surface, for real: alert rules under promtool's unit tests, every PromQL
expression of the alerts and the dashboard checked against the metric *and label* names a
live worker exposes, series that exist before their first event, and the metrics an
operator asks for first (oldest message in flight, in flight per route, last publish)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as pp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge import __version__
from bridge.limits import AWS_IOT_LIMITS, TopicLimits
from bridge.outcome import Kind, Outcome
from bridge.policy import POISON_DROPS
from bridge.reasons import PUBACK_FAILURES, dead_letter_reasons
from tests.conftest import S3, Rig
from tests.harness import Collector, Publisher, Worker, check, wait_until
from tests.test_archive import backup
from tests.test_deploy import DEPLOY, K8S, _grafana_expr, _json, _panels, _rules

PROMETHEUS = DEPLOY / "prometheus"
# Labels Prometheus adds to every scraped series, and series it makes itself.
TARGET_LABELS = frozenset({"instance", "job"})
PROMETHEUS_SERIES = {"up": TARGET_LABELS}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: run scripts/ensure-promtool.sh "
            "(apt-get install prometheus); `make test` does"
        )
    return found


# ---- promtool ----------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    checked = subprocess.run(
        [promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool(), "test", "rules", *sorted(p.name for p in PROMETHEUS.glob("*.test.yml"))],
        capture_output=True, text=True, timeout=120, check=False, cwd=PROMETHEUS,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_fires_in_a_unit_test() -> None:
    doc = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    # Every unit-test file of the rules counts (path-health.test.yml has its own group's).
    suites = [yaml.safe_load(path.read_text()) for path in PROMETHEUS.glob("*.test.yml")]
    fired = {
        case["alertname"]
        for suite in suites
        for test in suite["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in _rules()}
    assert alerts - fired == set(), "alerts without a test in which they fire"
    names = " ".join(test.get("name", "") for test in doc["tests"])
    # The two ways alerts failed before: a series born late, and a worker that vanished.
    assert "appears late" in names
    assert "dies" in names
    late = [s for t in doc["tests"] for s in t["input_series"] if s["values"].startswith("_")]
    assert {re.match(r"\w+", s["series"])[0] for s in late} >= {  # type: ignore[index]
        "mqtt_bridge_dead_lettered_total",
        "mqtt_bridge_archive_dropped_total",
    }


# ---- queries against a live worker ----------------------------------------------------------


def exposed(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names it carries, from a /metrics page."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


class Checker:
    """Walks one PromQL expression: every selector and label it names must exist."""

    def __init__(self, catalogue: dict[str, set[str]], where: str) -> None:
        self.catalogue = {**catalogue, **PROMETHEUS_SERIES}
        self.where = where
        self.problems: list[str] = []

    def fail(self, text: str) -> None:
        self.problems.append(f"{self.where}: {text}")

    def labels_of(self, node: Any) -> set[str]:
        """The labels the series of ``node`` carry (what `by`/`on`/legends may name)."""
        if isinstance(node, pp.MatrixSelector):
            return self.labels_of(node.vector_selector)
        if isinstance(node, pp.VectorSelector):
            name = node.name or ""
            if name not in self.catalogue:
                self.fail(f"no metric {name!r} on a live worker")
                return set(TARGET_LABELS)
            have = self.catalogue[name] | TARGET_LABELS
            for matcher in node.matchers.matchers:
                if matcher.name != "__name__" and matcher.name not in have:
                    self.fail(f"{name} has no label {matcher.name!r} (it has {sorted(have)})")
            return have
        if isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
            return self.labels_of(node.expr)
        if isinstance(node, pp.AggregateExpr):
            inner = self.labels_of(node.expr)
            modifier = node.modifier
            if modifier is None:
                return set()
            missing = set(modifier.labels) - inner
            if missing:
                self.fail(f"{node.op} by/without {sorted(missing)}: not labels of its input")
            if modifier.type == pp.AggModifierType.By:
                return set(modifier.labels)
            return inner - set(modifier.labels)
        if isinstance(node, pp.Call):
            return self._call(node)
        if isinstance(node, pp.BinaryExpr):
            return self._binary(node)
        return set()  # number and string literals

    def _call(self, node: Any) -> set[str]:
        name = node.func.name
        vectors = [self.labels_of(arg) for arg in node.args]
        if name == "absent":
            (arg,) = node.args
            return {m.name for m in arg.matchers.matchers if m.op == pp.MatchOp.Equal}
        if name == "histogram_quantile":
            if "le" not in vectors[1]:
                self.fail("histogram_quantile over series without 'le'")
            return vectors[1] - {"le"}
        if name == "label_replace":
            return vectors[0] | {node.args[1].val}
        if name in ("time", "vector", "scalar"):
            return set()
        return vectors[0] if vectors else set()

    def _binary(self, node: Any) -> set[str]:
        lhs, rhs = self.labels_of(node.lhs), self.labels_of(node.rhs)
        scalar = (pp.NumberLiteral, pp.StringLiteral)
        if isinstance(node.rhs, scalar) or _is_scalar_call(node.rhs):
            return lhs
        if isinstance(node.lhs, scalar) or _is_scalar_call(node.lhs):
            return rhs
        modifier = node.modifier
        matching = modifier.matching if modifier is not None else None
        if matching is not None:
            missing = set(matching.labels) - (lhs & rhs)
            if missing:
                self.fail(f"'{node.op}' on/ignoring {sorted(missing)}: not on both sides")
        group = set(modifier.group_labels or []) if modifier is not None else set()
        if group - rhs:
            self.fail(f"group_left/right {sorted(group - rhs)}: not labels of the other side")
        if str(node.op) == "or":
            return lhs & rhs
        if matching is not None and matching.type == pp.LabelModifierType.Include:
            arithmetic = str(node.op) in "+-*/%^" and not modifier.return_bool
            return (set(matching.labels) if arithmetic else lhs) | group
        return lhs | group


def _is_scalar_call(node: Any) -> bool:
    return isinstance(node, pp.Call) and node.func.name in ("time", "scalar")


def _legend_labels(text: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(where, PromQL, legendFormat) of every dashboard panel query."""
    dashboard = _json(DEPLOY / "grafana" / "mqtt-bridge.json")
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield (
                f"dashboard '{panel['title']}'",
                _grafana_expr(target["expr"]),
                target.get("legendFormat", ""),
            )


def query_problems(catalogue: dict[str, set[str]]) -> list[str]:
    problems: list[str] = []
    for rule in _rules():
        checker = Checker(catalogue, f"alert {rule['alert']}")
        kept = checker.labels_of(pp.parse(rule["expr"]))
        used = set(re.findall(r"\$labels\.(\w+)", str(rule["annotations"])))
        if used - kept:
            checker.fail(f"annotations use {sorted(used - kept)}, the expression keeps {kept}")
        problems += checker.problems
    for where, expr, legend in dashboard_queries():
        checker = Checker(catalogue, where)
        kept = checker.labels_of(pp.parse(expr))
        if _legend_labels(legend) - kept:
            checker.fail(f"legend uses {sorted(_legend_labels(legend) - kept)}: {expr}")
        problems += checker.problems
    dashboard = _json(DEPLOY / "grafana" / "mqtt-bridge.json")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"]
        found = re.fullmatch(r"label_values\((\w+)(\{.*\})?,\s*(\w+)\)", query)
        assert found, query
        checker = Checker(catalogue, f"variable ${variable['name']}")
        have = checker.labels_of(pp.parse(found[1] + (found[2] or "")))
        if found[3] not in have:
            checker.fail(f"{found[1]} has no label {found[3]!r}: the variable would be empty")
        problems += checker.problems
    return problems


def test_the_checker_catches_what_once_slipped_through() -> None:
    """The check must fail on the bugs it exists for (a test that cannot fail is a defect)."""
    old = {
        "mqtt_bridge_build_info": {"version"},  # no direction: the empty variable
        "mqtt_bridge_ready": {"direction"},
    }
    checker = Checker(old, "old")
    checker.labels_of(pp.parse('count by (direction) (mqtt_bridge_build_info{direction=~".*"})'))
    checker.labels_of(pp.parse("sum by (route) (mqtt_bridge_ready)"))
    checker.labels_of(pp.parse("mqtt_bridge_ready_peak"))
    assert len(checker.problems) == 4, checker.problems  # matcher, by, by, unknown metric


@pytest.fixture
def live_page(rig: Rig, s3: S3) -> tuple[Worker, str]:
    """A worker with every optional part (S3 archive, MQTT 5 target, AWS-style limits), and
    its first /metrics page, taken before any message."""
    limits = {k: AWS_IOT_LIMITS[k] for k in ("max_payload", "max_topic_bytes", "max_topic_slashes")}
    worker = rig.worker(
        [
            {"source": f"{rig.prefix}/a/#", "name": "a"},
            {
                "source": f"{rig.prefix}/b/#",
                "name": "b",
                "share_group": "g",
                "release_when_target_down": 30,
            },
            {
                "source": f"{rig.prefix}/c/+/x",
                "name": "c",
                "mode": "copy",
                "device": "{1}",
                "cohort": {"percent": 5},
            },
        ],
        backup=backup(s3),
        target={"url": rig.target.url, "protocol": "5", "connections": 2, "limits": limits},
    )
    status, text = worker._get("/metrics")
    assert status == 200
    return worker, text


def test_every_query_uses_metrics_and_labels_a_live_worker_exposes(
    live_page: tuple[Worker, str],
) -> None:
    _, text = live_page
    catalogue = exposed(text)
    assert query_problems(catalogue) == []


def test_series_exist_at_zero_before_their_first_event(live_page: tuple[Worker, str]) -> None:
    worker, text = live_page
    catalogue = exposed(text)
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "direction"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(f"mqtt_bridge_{name}", tuple(sorted(labels.items())))]

    for route in ("a", "b"):
        for reason in (
            "rejected_0x87", "rejected_0x80", "connection_dropped", "payload_too_large",
            "topic_too_long", "topic_too_deep", "reserved_topic", "packet_too_large",
        ):  # fmt: skip
            assert value("dead_lettered_total", route=route, reason=reason) == 0
        for reason in ("full", "loop", "expired"):
            assert value("dropped_total", route=route, reason=reason) == 0
        assert value("route_inflight_messages", route=route) == 0
        assert value("route_last_published_timestamp_seconds", route=route) == 0
    assert value("dead_lettered_total", route="a", reason="no_route") == 0
    for connection in ("0", "1"):
        for reason in ("quota_exceeded", "disconnect_quota_exceeded"):
            assert value("throttled_total", connection=connection, reason=reason) == 0
        for reason in ("session_taken_over", "receive_maximum_exceeded", "quota_exceeded"):
            assert value("disconnects_total", connection=connection, reason=reason) == 0
        assert value("connection_rate_limit_messages_per_second", connection=connection) == 0
    assert value("archive_dropped_total") == 0
    assert value("inflight_oldest_age_seconds") == 0
    assert catalogue["mqtt_bridge_build_info"] == {"direction", "instance_id", "version"}
    assert value("build_info", instance_id="w-0", version=__version__) == 1
    assert not [name for name in catalogue if name.endswith("_peak")]
    assert worker.metrics()["ready"] == 1


def test_seeded_dead_letter_reasons_are_the_labels_the_code_produces() -> None:
    limits = TopicLimits(10, 20, 2)
    seeded = set(dead_letter_reasons(limits, target_v5=True))
    produced = {
        problem.split(":", 1)[0]
        for topic, size in ((b"t", 11), (b"x" * 21, 1), (b"a/b/c/d", 1), (b"$SYS/x", 1))
        if (problem := limits.violation(topic, size)) is not None
    }
    assert len(produced) == 4
    outcomes = [Outcome(kind) for kind in (Kind.POISON, Kind.TOO_LARGE, Kind.UNENCODABLE)]
    outcomes += [Outcome.rejected(code) for code in PUBACK_FAILURES]
    produced |= {outcome.dead_letter_reason(POISON_DROPS)[1] for outcome in outcomes}
    assert produced <= seeded, produced - seeded
    # A 3.1.1 target answers no reason codes, and limits not set cannot be broken.
    bare = set(dead_letter_reasons(TopicLimits(), target_v5=False))
    assert not [r for r in bare if r.startswith("rejected_") or r.startswith("topic_too")]


def test_kubernetes_scrapes_name_the_worker_not_its_address() -> None:
    monitor = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"} in (
        endpoint["relabelings"]
    )


# ---- the metrics an operator asks for first ------------------------------------------------


def test_oldest_in_flight_per_route_and_last_publish_follow_an_outage(rig: Rig) -> None:
    routes = [
        {"source": f"{rig.prefix}/slow/#", "name": "slow"},
        {"source": f"{rig.prefix}/idle/#", "name": "idle"},
    ]
    worker = rig.worker(routes, flow={"max_inflight": 100})
    topics = [f"{rig.prefix}/slow/{i}" for i in range(2)]
    with (
        Collector(rig.target.url, f"{rig.prefix}/#", client_id="obs-collector") as collector,
        Publisher(rig.source.url) as pub,
    ):
        pub.publish_numbered(topics, 50)
        pub.wait_acked()
        collector.wait_for(50, 30)
        before = worker.metrics()
        rig.target.stop()
        wait_until(lambda: not worker.ready(), 10, what="readiness to drop")
        for i in range(40):  # numbered on from the first 50 (25 per topic)
            pub.publish(topics[i % 2], 25 + i // 2)
        wait_until(lambda: worker.metrics()["inflight_messages"] == 40, 20, what="40 held")
        time.sleep(1.5)
        during = worker.metrics()
        rig.target.start()
        wait_until(lambda: worker.metrics()["inflight_messages"] == 0, 30, what="drained")
        after = worker.metrics()
        collector.wait_for(90, 30)
        report = check(pub.acked(), collector.messages)
    assert report.lost == 0, report
    assert before["route_last_published_timestamp_seconds{route=slow}"] > time.time() - 60
    assert before["route_last_published_timestamp_seconds{route=idle}"] == 0
    # The outage: everything in flight is the slow route's, and it has waited ≥ 1.5 s.
    assert during["route_inflight_messages{route=slow}"] == 40
    assert during["route_inflight_messages{route=idle}"] == 0
    assert during["inflight_oldest_age_seconds"] >= 1.5
    assert (
        during["route_last_published_timestamp_seconds{route=slow}"]
        == before["route_last_published_timestamp_seconds{route=slow}"]
    )
    # After: nothing held, nothing old, and the last publish moved on.
    assert after["route_inflight_messages{route=slow}"] == 0
    assert after["inflight_oldest_age_seconds"] == 0
    assert (
        after["route_last_published_timestamp_seconds{route=slow}"]
        > during["route_last_published_timestamp_seconds{route=slow}"]
    )


def test_docs_point_at_the_source_brokers_backlog() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Source broker backlog", 1)[1].split("\n## ", 1)[0]
    assert "$SYS/broker/" in section  # Mosquitto
    assert "emqx_" in section  # EMQX's Prometheus metrics
