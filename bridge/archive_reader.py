"""Reading archive objects back: bounded, streaming decompression into checked records.

An object in S3 is untrusted input: 400 KB of gzip can inflate to a gigabyte. So it is
inflated a piece at a time, a line longer than ``max_record_bytes`` is skipped as it
streams past (never held), and inflating stops at ``max_object_bytes``. Each record is
checked as it comes out: a bad one is reported with its line number and skipped, the
rest of the object goes on. An object that is broken as a whole (not gzip, cut short,
over the bound) raises ``ObjectError``. Pure: bytes in, records out, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from bridge import mqtt_codec as codec
from bridge.archive import properties_from_json
from bridge.routing import topic_name_problem

# Compressed bytes fed to zlib per step, and the most it may inflate them to at once.
_IN_STEP = 64 * 1024
_OUT_STEP = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ReadLimits:
    max_record_bytes: int = 16 * 1024 * 1024  # one JSON line (base64 payload included)
    max_object_bytes: int = 256 * 1024 * 1024  # one object, inflated


class ObjectError(ValueError):
    """The object as a whole cannot be read: none of it should be replayed."""


@dataclass(slots=True)
class Record:
    topic: str
    target_topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float
    route: str | None
    properties: codec.Properties


@dataclass(frozen=True, slots=True)
class BadRecord:
    line: int  # 1-based, in the inflated object
    reason: str


def read_records(compressed: bytes, limits: ReadLimits) -> Iterator[Record | BadRecord]:
    """The records of one object, in order. Raises ObjectError when the object is broken
    as a whole, possibly after some records came out: check it with ``count_records``
    first when it must be replayed whole or not at all."""
    number = 0
    for line in _lines(compressed, limits):
        number += 1
        if line is None:
            yield BadRecord(number, f"longer than {limits.max_record_bytes} bytes")
            continue
        if not line.strip():
            continue
        try:
            yield parse_record(line)
        except (ValueError, TypeError, KeyError) as exc:
            yield BadRecord(number, str(exc) or type(exc).__name__)


def count_records(compressed: bytes, limits: ReadLimits) -> int:
    """Read the whole object once (nothing kept); raises ObjectError like read_records."""
    return sum(1 for _ in read_records(compressed, limits))


def _lines(compressed: bytes, limits: ReadLimits) -> Iterator[bytes | None]:
    """Inflated lines; None for a line over ``max_record_bytes`` (skipped, not held)."""
    line = bytearray()
    too_long = False
    total = 0
    for piece in _inflate(compressed):
        total += len(piece)
        if total > limits.max_object_bytes:
            raise ObjectError(f"inflates to more than {limits.max_object_bytes} bytes")
        start = 0
        while (newline := piece.find(b"\n", start)) >= 0:
            if not too_long and len(line) + newline - start <= limits.max_record_bytes:
                line += piece[start:newline]
                yield bytes(line)
            else:
                yield None
            line.clear()
            too_long = False
            start = newline + 1
        rest = len(piece) - start
        if too_long or len(line) + rest > limits.max_record_bytes:
            too_long = True
            line.clear()
        else:
            line += piece[start:]
    if too_long:
        yield None
    elif line:
        yield bytes(line)


def _inflate(compressed: bytes) -> Iterator[bytes]:
    """gzip members one after another (``gzip.decompress`` reads concatenated members
    too), in pieces of at most ``_OUT_STEP`` bytes."""
    data = memoryview(compressed)
    if not data:
        raise ObjectError("empty object")
    pos = 0
    while pos < len(data):
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            while not inflater.eof:
                chunk: bytes | memoryview
                if inflater.unconsumed_tail:
                    chunk = inflater.unconsumed_tail
                elif pos < len(data):
                    chunk = data[pos : pos + _IN_STEP]
                    pos += len(chunk)
                else:
                    raise ObjectError("cut short: the gzip stream does not end")
                piece = inflater.decompress(chunk, _OUT_STEP)
                if piece:
                    yield piece
        except zlib.error as exc:
            raise ObjectError(f"not a valid gzip stream ({exc})") from None
        # What zlib read past this member's end belongs to the next member.
        pos -= len(inflater.unused_data)


def parse_record(line: bytes) -> Record:
    """One JSON line as the archive writes it (``archive.record``); raises ValueError or
    TypeError naming the first thing wrong."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise TypeError("not a JSON object")
    missing = [k for k in ("topic", "target_topic", "payload_b64", "qos", "retain", "received_at")
               if k not in obj]  # fmt: skip
    if missing:
        raise ValueError(f"record without {', '.join(missing)}")
    topic = _text(obj, "topic")
    target_topic = _text(obj, "target_topic")
    for name, value in (("topic", topic), ("target_topic", target_topic)):
        problem = topic_name_problem(value)
        if problem is not None:
            raise ValueError(f"{name}: {problem.split(': ', 1)[1]}")
    try:
        payload = base64.b64decode(_text(obj, "payload_b64"), validate=True)
    except binascii.Error:
        raise ValueError("payload_b64 is not base64") from None
    qos = obj["qos"]
    if type(qos) is not int or qos not in (0, 1, 2):
        raise TypeError("qos must be 0, 1 or 2")
    retain = obj["retain"]
    if not isinstance(retain, bool):
        raise TypeError("retain must be true or false")
    received_at = obj["received_at"]
    if isinstance(received_at, bool) or not isinstance(received_at, int | float):
        raise TypeError("received_at must be a number")
    if not math.isfinite(received_at):
        raise ValueError("received_at must be finite")
    route = obj.get("route")
    if route is not None and not isinstance(route, str):
        raise TypeError("route must be text")
    properties: Any = obj.get("properties") or {}
    return Record(
        topic, target_topic, payload, qos, retain, float(received_at), route,
        properties_from_json(properties),
    )  # fmt: skip


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be text")
    return value
