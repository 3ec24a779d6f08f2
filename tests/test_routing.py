"""Topic filters, templates and loop detection, checked against simple reference models."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.routing import (
    TopicFilter,
    TopicTemplate,
    filter_pattern,
    patterns_overlap,
    template_pattern,
    topic_name_problem,
)

level = st.text(alphabet="abc$ x", min_size=0, max_size=3)
topics = st.lists(level, min_size=1, max_size=5).map("/".join).filter(bool)  # "" is no topic


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(level, st.just("+")), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    text = "/".join(levels)
    return text or "+"


def reference_match(topic_filter: str, topic: str) -> bool:
    """MQTT matching written as a regular expression, independently of routing.py."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    pattern = ""
    levels = topic_filter.split("/")
    for i, lvl in enumerate(levels):
        sep = "/" if i else ""
        if lvl == "#":
            pattern += "(?:/.*)?" if i else ".*"
        elif lvl == "+":
            pattern += sep + "[^/]*"
        else:
            pattern += sep + re.escape(lvl)
    return re.fullmatch(pattern, topic) is not None


@given(filters(), topics)
def test_matching_agrees_with_reference(topic_filter: str, topic: str) -> None:
    assert TopicFilter.parse(topic_filter).matches(topic) == reference_match(topic_filter, topic)


@given(topics, st.data())
def test_captures_rebuild_the_topic(topic: str, data: st.DataObject) -> None:
    levels = topic.split("/")
    wild = data.draw(st.lists(st.booleans(), min_size=len(levels), max_size=len(levels)))
    cut = data.draw(st.integers(0, len(levels)))
    pattern = ["+" if w else lvl for lvl, w in zip(levels[:cut], wild, strict=False)]
    if cut < len(levels):
        pattern.append("#")
    if topic.startswith("$") and pattern[0] in ("+", "#"):
        return
    topic_filter = TopicFilter.parse("/".join(pattern))
    captures = topic_filter.captures(topic)
    assert captures is not None
    # A template that puts every capture back where it came from is the identity.
    parts = []
    n = 0
    for lvl in pattern:
        if lvl in ("+", "#"):
            n += 1
            parts.append(f"{{{n}}}")
        else:
            parts.append(lvl)
    template = "/".join(parts)
    if not template or (template == "{1}" and pattern == ["#"] and topic == ""):
        return
    rendered = TopicTemplate.parse(template, topic_filter).render(topic, captures)
    assert rendered == topic or (pattern[-1] == "#" and rendered == topic + "/")


def test_templates() -> None:
    f = TopicFilter.parse("devices/+/telemetry/#")
    t = TopicTemplate.parse("dt/{1}/{2}", f)
    assert (
        t.render("devices/d1/telemetry/a/b", f.captures("devices/d1/telemetry/a/b") or ())
        == "dt/d1/a/b"
    )
    assert (
        TopicTemplate.parse("x/{topic}", f).render("devices/d/telemetry", ("d", ""))
        == "x/devices/d/telemetry"
    )
    with pytest.raises(ValueError, match=r"capture \{3\} but the filter has 2 wildcards"):
        TopicTemplate.parse("{3}", f)
    with pytest.raises(ValueError, match="unbalanced"):
        TopicTemplate.parse("a/{1", f)


@given(filters(), filters(), topics)
def test_overlap_never_misses_a_common_topic(a: str, b: str, topic: str) -> None:
    fa, fb = TopicFilter.parse(a), TopicFilter.parse(b)
    if fa.matches(topic) and fb.matches(topic):
        assert patterns_overlap(filter_pattern(fa), filter_pattern(fb))
    assert patterns_overlap(filter_pattern(fa), filter_pattern(fb)) == patterns_overlap(
        filter_pattern(fb), filter_pattern(fa)
    )


@given(
    filters(),
    topics,
    st.sampled_from(["out/{topic}", "{topic}", "x/{1}", "{1}/y", "a{1}b/c"]),
    filters(),
)
def test_template_pattern_covers_every_rendered_topic(
    src: str, topic: str, template: str, other: str
) -> None:
    f = TopicFilter.parse(src)
    try:
        t = TopicTemplate.parse(template, f)
    except ValueError:
        return
    captures = f.captures(topic)
    if captures is None:
        return
    rendered = t.render(topic, captures)
    o = TopicFilter.parse(other)
    if o.matches(rendered) and not rendered.startswith("$"):
        assert patterns_overlap(template_pattern(t, f), filter_pattern(o))


def test_overlap_examples() -> None:
    def ov(a: str, b: str) -> bool:
        return patterns_overlap(
            filter_pattern(TopicFilter.parse(a)), filter_pattern(TopicFilter.parse(b))
        )

    assert ov("a/#", "a")
    assert ov("a/+/c", "+/b/#")
    assert not ov("a/+/c", "a/b/d")
    assert not ov("dt/+/up", "devices/#")
    assert ov("#", "x/y")


# ---- received topic names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "alias", "reason"),
    [
        ("a/+/b", None, "invalid_topic: a wildcard ('+' or '#') in a topic name"),
        ("a/#", None, "invalid_topic: a wildcard ('+' or '#') in a topic name"),
        ("a/\x00", None, "invalid_topic: a NUL character in the topic name"),
        ("", None, "invalid_topic: empty topic name"),
        ("", 3, "invalid_topic: topic alias 3, which we never allowed"),
        ("a/b", 1, "invalid_topic: topic alias 1, which we never allowed"),
    ],
)
def test_topic_names_no_broker_may_deliver(topic: str, alias: int | None, reason: str) -> None:
    assert topic_name_problem(topic, alias) == reason


@given(st.text(max_size=30))
def test_a_topic_name_that_passes_can_be_published_anywhere(topic: str) -> None:
    """What passes is a publishable MQTT topic name (MQTT 4.7.1, 1.5.4); what fails is not."""
    publishable = bool(topic) and not set(topic) & {"+", "#", "\x00"}
    assert (topic_name_problem(topic) is None) == publishable
