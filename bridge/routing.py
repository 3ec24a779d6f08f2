"""Topic filters, target templates and loop detection: pure functions, no I/O.

A route maps a source topic filter to a target topic template. ``{n}`` is the n-th
wildcard capture of the filter (``+`` captures one level, ``#`` the rest, possibly
several levels or nothing) and ``{topic}`` the whole source topic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def topic_name_problem(topic: str, topic_alias: int | None = None) -> str | None:
    """Why a received topic name can never be published anywhere, or None (MQTT 4.7).

    A broker must not deliver such a name, but a broken one does; forwarded, it makes
    the target disconnect again and again. The reason starts with its metric label.
    """
    if topic_alias is not None:
        # We announce no Topic Alias Maximum, so no alias can refer to anything.
        return f"invalid_topic: topic alias {topic_alias}, which we never allowed"
    if not topic:
        return "invalid_topic: empty topic name"
    if "+" in topic or "#" in topic:
        return "invalid_topic: a wildcard ('+' or '#') in a topic name"
    if "\x00" in topic:
        return "invalid_topic: a NUL character in the topic name"
    return None


@dataclass(frozen=True, slots=True)
class TopicFilter:
    text: str
    levels: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> TopicFilter:
        """Validate an MQTT topic filter (MQTT 5, 4.7); raises ValueError with the reason."""
        if not text:
            raise ValueError("empty topic filter")
        if "\x00" in text:
            raise ValueError("topic filter contains a NUL character")
        if len(text.encode()) > 65535:
            raise ValueError("topic filter longer than 65535 bytes")
        if text.startswith("$share/"):
            raise ValueError("write the filter without $share/…; use share_group for that")
        levels = tuple(text.split("/"))
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError("'#' must be a whole level and the last one")
            if "+" in level and level != "+":
                raise ValueError("'+' must be a whole level")
        return cls(text, levels)

    @property
    def wildcards(self) -> int:
        return sum(level in ("+", "#") for level in self.levels)

    def captures(self, topic: str) -> tuple[str, ...] | None:
        """The wildcard captures when ``topic`` matches, else None."""
        levels = topic.split("/")
        # Wildcards at the first level never match topics starting with '$' (MQTT 4.7.2).
        if topic.startswith("$") and self.levels[0] in ("+", "#"):
            return None
        got: list[str] = []
        for i, pattern in enumerate(self.levels):
            if pattern == "#":
                got.append("/".join(levels[i:]))
                return tuple(got)
            if i >= len(levels):
                return None
            if pattern == "+":
                got.append(levels[i])
            elif pattern != levels[i]:
                return None
        return tuple(got) if len(levels) == len(self.levels) else None

    def matches(self, topic: str) -> bool:
        return self.captures(topic) is not None


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    text: str
    # Literal strings, capture indexes (0-based) and -1 for the whole topic.
    parts: tuple[str | int, ...]

    @classmethod
    def parse(cls, text: str, source: TopicFilter) -> TopicTemplate:
        if not text:
            raise ValueError("empty target topic")
        if "\x00" in text:
            raise ValueError("target topic contains a NUL character")
        if "+" in text or "#" in text:
            raise ValueError("a target topic cannot contain the wildcards '+' or '#'")
        parts: list[str | int] = []
        pos = 0
        for found in _PLACEHOLDER.finditer(text):
            if found.start() > pos:
                parts.append(text[pos : found.start()])
            name = found.group(1)
            if name == "topic":
                parts.append(-1)
            elif name.isdigit() and int(name) >= 1:
                n = int(name)
                if n > source.wildcards:
                    have = source.wildcards
                    raise ValueError(
                        f"capture {{{n}}} but the filter has {have} wildcard{'s' * (have != 1)}"
                    )
                parts.append(n - 1)
            else:
                raise ValueError(
                    f"unknown placeholder {{{name}}}: use {{1}}, {{2}}, … or {{topic}}"
                )
            pos = found.end()
        if pos < len(text):
            parts.append(text[pos:])
        literal = "".join(p for p in parts if isinstance(p, str))
        if "{" in literal or "}" in literal:
            raise ValueError("unbalanced '{' or '}' in the target topic")
        return cls(text, tuple(parts))

    def render(self, topic: str, captures: Sequence[str]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif part < 0:
                out.append(topic)
            else:
                out.append(captures[part])
        return "".join(out)


# ---- loop detection ------------------------------------------------------------
# A pattern is a tuple of levels: a literal string, ONE (any one level) or MANY
# (zero or more levels). Templates become patterns conservatively: a level that holds
# a capture of '+' is ONE, a capture of '#' is MANY, so an overlap is never missed.
ONE = "\x00+"
MANY = "\x00#"


def filter_pattern(topic_filter: TopicFilter) -> tuple[str, ...]:
    return tuple({"+": ONE, "#": MANY}.get(level, level) for level in topic_filter.levels)


def template_pattern(template: TopicTemplate, source: TopicFilter) -> tuple[str, ...]:
    wild = [level for level in source.levels if level in ("+", "#")]
    source_pattern = filter_pattern(source)
    out: list[str] = []
    level: list[str | int] = []

    def close_level() -> None:
        if not level:
            out.append("")
        elif all(isinstance(p, str) for p in level):
            out.append("".join(str(p) for p in level))
        elif len(level) == 1 and level[0] == -1:
            out.extend(source_pattern)
        else:
            spans_levels = any(p == -1 or (isinstance(p, int) and wild[p] == "#") for p in level)
            out.append(MANY if spans_levels else ONE)
        level.clear()

    for part in template.parts:
        if isinstance(part, str):
            pieces = part.split("/")
            for i, piece in enumerate(pieces):
                if i:
                    close_level()
                if piece:
                    level.append(piece)
        else:
            level.append(part)
    close_level()
    return tuple(out)


def patterns_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when some topic matches both patterns."""

    @cache
    def overlap(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if (
            i < len(a)
            and a[i] == MANY
            and (overlap(i + 1, j) or (j < len(b) and overlap(i, j + 1)))
        ):
            return True
        if (
            j < len(b)
            and b[j] == MANY
            and (overlap(i, j + 1) or (i < len(a) and overlap(i + 1, j)))
        ):
            return True
        if i == len(a) or j == len(b) or a[i] == MANY or b[j] == MANY:
            return False
        if a[i] == ONE or b[j] == ONE or a[i] == b[j]:
            return overlap(i + 1, j + 1)
        return False

    return overlap(0, 0)


def plan_subscriptions(
    filters: list[tuple[str, int]], per_connection: int | None
) -> list[list[tuple[str, int]]]:
    """Spread subscriptions over as few connections as the per-connection cap allows."""
    if not per_connection or len(filters) <= per_connection:
        return [filters]
    return [filters[i : i + per_connection] for i in range(0, len(filters), per_connection)]
