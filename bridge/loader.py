"""Reading a configuration so that nothing is lost without a word.

- YAML with a key given twice is refused, with both line numbers: PyYAML would keep the
  last one, and a second ``routes:`` block would silently drop the first one's routes.
- A YAML syntax error says in plain words what is wrong, beside the parser's own text.
- A ``BRIDGE_…`` variable that names no setting is an error naming it and its nearest
  valid name: ``BRIDGE_TARGET_URL`` (one underscore) would otherwise be ignored.
- A problem with a value set by a variable names the variable, not the file.

The settings model (``config.BridgeConfig``) stays the single list of what exists: the
valid variable names are derived from its fields.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from bridge.errors import ConfigError

ENV_PREFIX = "BRIDGE_"
NESTING = "__"
# How a problem caused by a variable starts: `check` prints it as is, not under a file name.
ENV_ORIGIN = "environment "

# ---- YAML ------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that records keys given twice in one mapping instead of keeping the last."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []  # key, first line, repeated line

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by explicit keys: that is its job
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping below reports it
            if first is None:
                seen[key] = line
            else:
                self.duplicates.append((str(key), first, line))
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of one YAML file; ConfigError naming the file and line if not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (at byte {exc.start})"]) from None
    try:
        # The reader checks the characters as it is built: NUL and friends raise here.
        loader = _StrictLoader(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {explain_yaml_error(exc)}"]) from None
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {explain_yaml_error(exc)}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply"]) from None
    except (ValueError, TypeError) as exc:
        # PyYAML's constructors raise these for values such as the date 2023-13-45.
        raise ConfigError([f"{path}: {exc} (quote the value if it is meant as text)"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(
            [
                f"{path}: line {again}: duplicate key {key!r} (first at line {first}): "
                "the second would silently replace the first; merge them into one"
                for key, first, again in loader.duplicates
            ]
        )
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    return raw


# PyYAML's problem text -> what it usually means in a hand-written config file.
_PLAIN: tuple[tuple[str, str], ...] = (
    ("found character '\\t'", "a tab character: YAML indents with spaces only"),
    (
        "mapping values are not allowed here",
        "a ':' where none can be: quote a value that contains ': ', or check this "
        "line's indentation",
    ),
    (
        "could not find expected ':'",
        "a line that is not 'key: value': a ':' is missing, or a text value runs over "
        "several lines without quotes",
    ),
    (
        "while parsing a block collection",
        "the items of a list do not all start with '-' at the same indentation",
    ),
    ("expected <block end>", "this line's indentation does not line up with the keys above"),
    (
        "did not find expected key",
        "this line's indentation does not line up with the keys above",
    ),
    (
        "did not find expected '-' indicator",
        "the items of a list do not all start with '-' at the same indentation",
    ),
    ("expected ',' or ']'", "a '[' list is not closed with ']'"),
    ("expected ',' or '}'", "a '{' mapping is not closed with '}'"),
    ("found unexpected end of stream", "a quote is opened and never closed"),
    ("found undefined alias", "'*name' refers to an anchor '&name' that is not defined"),
    (
        "found unknown escape character",
        "an unknown backslash escape in double quotes: use single quotes for such text",
    ),
    ("that cannot start any token", "a value that starts with this character must be quoted"),
    ("found unhashable key", "a key that is itself a list or a mapping"),
    ("but found another document", "more than one document ('---'): a config holds one"),
)


def explain_yaml_error(exc: yaml.YAMLError) -> str:
    """``line L, column C: <plain words> (YAML: <the parser's words>)``: one line."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character #x{exc.character:04x} is not allowed in YAML (at {exc.position})"
    problem = str(getattr(exc, "problem", None) or "")
    context = str(getattr(exc, "context", None) or "")
    plain = next(
        (words for needle, words in _PLAIN if needle in problem or needle in context),
        "this is not valid YAML",
    )
    mark = getattr(exc, "problem_mark", None)
    opened = getattr(exc, "context_mark", None)
    if opened is not None and mark is not None:
        if "end of stream" in problem or "<stream end>" in problem:
            # An unclosed bracket or quote is found where the file ends: show where it opened.
            plain += f" (opened here; the file ends at line {mark.line + 1})"
            mark = opened
        elif "expected ':'" in problem:
            mark = opened  # the key without ':' is where the scan started, not where it gave up
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    parser = ", ".join(part for part in (context, problem) if part) or str(exc)
    return f"{where}{plain} (YAML: {parser})".replace("\n", " ")


# ---- environment -----------------------------------------------------------------------


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The settings models an annotation holds (through Optional, Annotated, unions)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _models(typing.get_args(annotation)[0])
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _models(arg)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_mapping(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_mapping(a) for a in typing.get_args(annotation))
    return origin in (dict, Mapping) or annotation is dict


def variables(model: type[BaseModel], prefix: str = ENV_PREFIX) -> tuple[set[str], set[str]]:
    """(every variable naming a setting, prefixes under which any name is valid).

    A section can be set whole (``BRIDGE_FLOW='{"max_inflight": 5}'``) or key by key
    (``BRIDGE_FLOW__MAX_INFLIGHT=5``); lists (``routes``) only whole, as JSON; a free-form
    mapping takes any key below its name.
    """
    names: set[str] = set()
    open_prefixes: set[str] = set()
    for field_name, field in model.model_fields.items():
        name = prefix + field_name.upper()
        names.add(name)
        if _is_mapping(field.annotation):
            open_prefixes.add(name + NESTING)
        for sub in _models(field.annotation):
            sub_names, sub_open = variables(sub, name + NESTING)
            names |= sub_names
            open_prefixes |= sub_open
    return names, open_prefixes


def bridge_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``BRIDGE_…`` variables, by upper-case name (the settings ignore case)."""
    return {k.upper(): k for k in environ if k.upper().startswith(ENV_PREFIX)}


def unknown_variables(environ: Mapping[str, str], model: type[BaseModel]) -> list[str]:
    """One problem per ``BRIDGE_…`` variable that sets nothing, with the nearest valid name."""
    names, open_prefixes = variables(model)
    problems = []
    for upper, given in sorted(bridge_variables(environ).items()):
        if upper in names or any(upper.startswith(p) for p in open_prefixes):
            continue
        problems.append(f"{ENV_ORIGIN}{given}: no such setting{_hint(upper, names)}")
    return problems


def _hint(upper: str, names: set[str]) -> str:
    parts = upper.split(NESTING)
    for end in range(len(parts) - 1, 0, -1):
        parent = NESTING.join(parts[:end])
        if parent in names and not any(n.startswith(parent + NESTING) for n in names):
            return f"; {parent} is set whole (as JSON), not key by key"
    # Compared without the prefix every name shares, which would make anything look near.
    bare = sorted(n.removeprefix(ENV_PREFIX) for n in names)
    near = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), bare, n=1, cutoff=0.6)
    if near:
        return f"; did you mean {ENV_PREFIX}{near[0]}?"
    return f"; sections nest with '{NESTING}', e.g. {ENV_PREFIX}TARGET{NESTING}URL"


def variable_for(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    """The variable that set the value at ``loc`` (or a section around it), if one did."""
    present = bridge_variables(environ)
    keys = [str(part).upper() for part in loc]
    for end in range(len(keys), 0, -1):
        name = ENV_PREFIX + NESTING.join(keys[:end])
        if name in present:
            return present[name]
    return None


def variables_inside(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> list[str]:
    """The variables that set something inside the section at ``loc``."""
    prefix = ENV_PREFIX + NESTING.join(str(part).upper() for part in loc) + NESTING
    return sorted(
        given for upper, given in bridge_variables(environ).items() if upper.startswith(prefix)
    )
