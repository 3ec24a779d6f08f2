"""Reading archive objects back (bridge/archive_reader.py): pure, so checked in-process.

Round trip against the writer's record format at every chunk boundary, lines over the
record bound skipped wherever they fall, and memory bounded whatever an object inflates
to (tracemalloc is the oracle)."""

from __future__ import annotations

import base64
import gzip
import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import archive_reader
from bridge.archive_reader import BadRecord, ObjectError, ReadLimits, Record, read_records

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
               min_size=1, max_size=12)  # fmt: skip


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    props: dict[str, Any] = draw(st.fixed_dictionaries({}, optional={
        "content_type": text, "response_topic": text,
        "payload_format_indicator": st.integers(0, 1),
        "message_expiry_interval": st.integers(0, 2**32 - 1),
        "correlation_data_b64": st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode()),
        "user_properties": st.lists(st.lists(text, min_size=2, max_size=2), max_size=3),
    }))  # fmt: skip
    return {
        "topic": draw(text), "target_topic": draw(text),
        "payload_b64": base64.b64encode(draw(st.binary(max_size=300))).decode(),
        "qos": draw(st.integers(0, 1)), "retain": draw(st.booleans()), "properties": props,
        "received_at": draw(st.floats(0, 2e9)), "route": draw(st.none() | text),
    }  # fmt: skip


def gzipped(lines: list[bytes], members: int = 1) -> bytes:
    step = max(1, -(-len(lines) // members))
    return b"".join(
        gzip.compress(b"".join(line + b"\n" for line in lines[i : i + step]))
        for i in range(0, len(lines), step)
    ) or gzip.compress(b"")


@settings(max_examples=60, deadline=None)
@given(
    batch=st.lists(records(), min_size=1, max_size=8),
    members=st.integers(1, 3),
    steps=st.tuples(st.integers(1, 50), st.integers(1, 50)),
)
def test_what_the_writer_wrote_reads_back_at_every_chunk_boundary(
    batch: list[dict[str, Any]], members: int, steps: tuple[int, int]
) -> None:
    raw = gzipped([json.dumps(r).encode() for r in batch], members)
    with pytest.MonkeyPatch.context() as mp:
        # Tiny steps: lines, gzip members and records split at every possible place.
        mp.setattr(archive_reader, "_IN_STEP", steps[0])
        mp.setattr(archive_reader, "_OUT_STEP", steps[1])
        got = list(read_records(raw, ReadLimits()))
    assert all(isinstance(r, Record) for r in got)
    for record, want in zip(got, batch, strict=True):
        assert isinstance(record, Record)
        assert (record.topic, record.target_topic, record.qos, record.retain, record.route) == (
            want["topic"],
            want["target_topic"],
            want["qos"],
            want["retain"],
            want["route"],
        )
        assert record.payload == base64.b64decode(want["payload_b64"])
        assert record.received_at == want["received_at"]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12), step=st.integers(1, 64))
def test_lines_over_the_bound_are_skipped_wherever_they_fall(sizes: list[int], step: int) -> None:
    limit = 1024
    line = json.dumps({"topic": "a", "target_topic": "b", "qos": 0, "retain": False,
                       "received_at": 1.0, "payload_b64": ""}).encode()  # fmt: skip
    lines = [line + b" " * (size * 5) for size in sizes]  # JSON allows trailing blanks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(archive_reader, "_OUT_STEP", step)
        got = list(read_records(gzipped(lines), ReadLimits(max_record_bytes=limit)))
    assert len(got) == len(lines)
    for n, (item, raw) in enumerate(zip(got, lines, strict=True), 1):
        if len(raw) > limit:
            assert item == BadRecord(n, f"longer than {limit} bytes")
        else:
            assert isinstance(item, Record)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty object"),
        (b"not gzip at all", "not a valid gzip stream"),
        (gzip.compress(b'{"a": 1}\n')[:-9], "cut short"),
        (gzip.compress(b"{}\n") + b"trailing junk", "not a valid gzip stream"),
    ],
)
def test_objects_broken_as_a_whole(raw: bytes, problem: str) -> None:
    with pytest.raises(ObjectError, match=problem):
        list(read_records(raw, ReadLimits()))


def test_a_record_shaped_bomb_is_read_in_bounded_memory() -> None:
    """Valid records, 40 MB of them from 200 KB: stopped at the object bound, and
    nothing of what was read is kept (the memory peak stays below one step)."""
    line = json.dumps({"topic": "a/1", "target_topic": "b/1", "payload_b64": "eA==", "qos": 1,
                       "retain": False, "received_at": 1.0}).encode() + b"\n"  # fmt: skip
    bomb = gzip.compress(line * (40 * 1024 * 1024 // len(line)), 9)
    assert len(bomb) < 400_000
    seen = 0

    def read_all() -> None:
        nonlocal seen
        for _ in read_records(bomb, ReadLimits(max_object_bytes=8 * 1024 * 1024)):
            seen += 1

    tracemalloc.start()
    try:
        with pytest.raises(ObjectError, match="inflates to more than 8388608 bytes"):
            read_all()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen > 50_000  # it streamed records until the bound
    assert peak < 4 * 1024 * 1024, peak
