"""The routing index answers what the linear first-match scan answered, route for route."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.pipeline import CompiledRoute
from bridge.route_index import RouteIndex
from tests.test_routing import filters, topics


def linear(routes: list[CompiledRoute], topic: str) -> tuple[CompiledRoute, str] | None:
    """``pipeline.Bridge._match`` as it was before the index: first match wins."""
    for route in routes:
        captures = route.filter.captures(topic)
        if captures is not None:
            return route, route.template.render(topic, captures)
    return None


def compile_routes(texts: list[str]) -> list[CompiledRoute]:
    return [
        CompiledRoute(i, f"r{i}", text, "out/{topic}", 1, False) for i, text in enumerate(texts)
    ]


@settings(max_examples=400)
@given(st.lists(filters(), min_size=1, max_size=12), st.lists(topics, min_size=1, max_size=8))
def test_index_agrees_with_the_linear_scan(texts: list[str], probes: list[str]) -> None:
    routes = compile_routes(texts)
    # A tiny cache so that evictions and re-lookups happen within one example too.
    index = RouteIndex(routes, cache_size=3)
    for topic in probes + probes:
        assert index.match(topic) == linear(routes, topic), topic


@given(st.lists(filters(), min_size=1, max_size=12), topics)
def test_the_first_of_equal_filters_wins(texts: list[str], topic: str) -> None:
    # Duplicates (one filter, several routes) are legal config: the earliest wins.
    routes = compile_routes(texts + texts)
    found = RouteIndex(routes).first(topic)
    expected = linear(routes, topic)
    assert found == (expected[0].index if expected else None)
    assert found is None or found < len(texts)


def test_captures_reach_the_template() -> None:
    routes = [
        CompiledRoute(0, "a", "devices/+/telemetry", "dt/{1}/telemetry", 1, False),
        CompiledRoute(1, "b", "devices/#", "rest/{1}", 1, False),
        CompiledRoute(2, "c", "#", "all/{topic}", 1, False),
    ]
    index = RouteIndex(routes)
    assert index.match("devices/d1/telemetry") == (routes[0], "dt/d1/telemetry")
    assert index.match("devices/d1/state") == (routes[1], "rest/d1/state")
    assert index.match("devices") == (routes[1], "rest/")
    assert index.match("other") == (routes[2], "all/other")
    assert index.match("$SYS/x") is None  # '#' at the first level skips '$' topics


def test_cache_stays_bounded() -> None:
    routes = compile_routes(["devices/+/t"])
    index = RouteIndex(routes, cache_size=100)
    for i in range(1000):
        assert index.match(f"devices/{i}/t") == (routes[0], f"out/devices/{i}/t")
    assert len(index._cache) == 100


def test_many_routes_last_one_matches() -> None:
    # The bench's many-routes shape: 500 literal filters, traffic on the last one.
    routes = compile_routes([f"site/{i}/+/telemetry" for i in range(500)])
    index = RouteIndex(routes, cache_size=1)
    assert index.first("site/499/d7/telemetry") == 499
    assert index.first("site/500/d7/telemetry") is None
