"""The MQTT codec and connection against faults a real broker cannot produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import mqtt_codec as codec
from bridge.errors import ConnectionFailed, ProtocolViolation
from bridge.mqtt import Endpoint, MqttConnection, SessionOptions
from bridge.mqtt_codec import Publish

utf8 = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)
properties = st.fixed_dictionaries(
    {},
    optional={
        codec.PAYLOAD_FORMAT: st.integers(0, 1),
        codec.MESSAGE_EXPIRY: st.integers(0, 2**32 - 1),
        codec.CONTENT_TYPE: utf8,
        codec.RESPONSE_TOPIC: utf8,
        codec.CORRELATION_DATA: st.binary(max_size=20),
        codec.USER_PROPERTY: st.lists(st.tuples(utf8, utf8), min_size=1, max_size=4),
    },
)


@given(
    topic=utf8.filter(bool),
    payload=st.binary(max_size=300),
    qos=st.integers(0, 1),
    retain=st.booleans(),
    packet_id=st.integers(1, 65535),
    protocol=st.sampled_from([codec.PROTOCOL_311, codec.PROTOCOL_5]),
    props=properties,
)
def test_publish_round_trip(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    packet_id: int,
    protocol: int,
    props: dict[int, Any],
) -> None:
    raw = bytearray(
        codec.encode_publish(topic.encode(), payload, qos, retain, packet_id, protocol, props)
    )
    found = codec.split_packet(raw, 0)
    assert found is not None
    first, start, end = found
    assert end == len(raw)
    msg = codec.decode_publish(first, bytes(raw[start:end]), protocol)
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, payload, qos, retain)
    assert msg.packet_id == (packet_id if qos else 0)
    if protocol == codec.PROTOCOL_5:
        assert (msg.properties or {}) == props
    # Any strict prefix is incomplete, never an error.
    for cut in range(len(raw)):
        assert codec.split_packet(raw[:cut], 0) is None


@given(st.integers(0, 268_435_455))
def test_varint_round_trip(value: int) -> None:
    raw = codec.encode_varint(value)
    assert codec.decode_varint(raw, 0) == (value, len(raw))


def test_varint_longer_than_four_bytes_is_malformed() -> None:
    with pytest.raises(codec.MalformedPacket):
        codec.decode_varint(b"\xff\xff\xff\xff\x01", 0)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[int]:
    """A loopback server that closes every connection it accepted when the test ends."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await handler(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


class FakeBroker:
    """Answers CONNECT with CONNACK, then sends scripted bytes in scripted chunks."""

    def __init__(self, script: list[bytes], close_after: bool = False) -> None:
        self.script = script
        self.close_after = close_after
        self.received = bytearray()
        self._server = fake_server(self._serve)

    async def __aenter__(self) -> int:
        return await self._server.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await self._server.__aexit__(None, None, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received += await reader.read(1024)  # CONNECT
        writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK v5: success, no properties
        for chunk in self.script:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0)
        if self.close_after:
            writer.close()
            return
        while data := await reader.read(1024):
            self.received += data


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Publish] = []
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def on_message(self, conn: MqttConnection, msg: Publish) -> bool:
        self.messages.append(msg)
        return True

    def on_puback(self, conn: MqttConnection, packet_id: int, reason_code: int) -> None:
        pass

    def on_writable(self, conn: MqttConnection, writable: bool) -> None:
        pass

    def on_connection_lost(self, conn: MqttConnection, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


OPTIONS = SessionOptions(client_id="t", protocol=codec.PROTOCOL_5, clean_start=True, keepalive=0)


async def test_packets_split_at_every_byte_are_reassembled() -> None:
    packets = b"".join(
        codec.encode_publish(
            f"t/{i}".encode(),
            bytes([i]) * i,
            1,
            False,
            i + 1,
            codec.PROTOCOL_5,
            {codec.USER_PROPERTY: [("n", str(i))]},
        )
        for i in range(20)
    )
    one_byte_chunks = [packets[i : i + 1] for i in range(len(packets))]
    recorder = Recorder()
    async with FakeBroker(one_byte_chunks) as port:
        conn = MqttConnection(OPTIONS, recorder)
        await conn.connect(Endpoint("127.0.0.1", port))
        for _ in range(200):
            if len(recorder.messages) == 20:
                break
            await asyncio.sleep(0.01)
        await conn.disconnect()
    assert [m.topic for m in recorder.messages] == [f"t/{i}" for i in range(20)]
    assert [m.properties for m in recorder.messages] == [
        {codec.USER_PROPERTY: [("n", str(i))]} for i in range(20)
    ]


async def test_malformed_bytes_close_the_connection_with_a_clear_error() -> None:
    recorder = Recorder()
    # A PUBLISH whose topic length claims more bytes than the packet holds.
    async with FakeBroker([b"\x30\x03\x00\x09a"]) as port:
        conn = MqttConnection(OPTIONS, recorder)
        await conn.connect(Endpoint("127.0.0.1", port))
        error = await asyncio.wait_for(recorder.lost, 5)
    assert isinstance(error, ConnectionFailed)
    assert "malformed packet from the broker" in str(error)
    assert recorder.messages == []


async def test_eof_in_the_middle_of_a_packet_is_a_lost_connection() -> None:
    recorder = Recorder()
    whole = codec.encode_publish(b"t", b"x" * 100, 1, False, 1, codec.PROTOCOL_5)
    async with FakeBroker([whole[:50]], close_after=True) as port:
        conn = MqttConnection(OPTIONS, recorder)
        await conn.connect(Endpoint("127.0.0.1", port))
        await asyncio.wait_for(recorder.lost, 5)
    assert recorder.messages == []
    assert not conn.is_open


async def test_connack_refusal_names_the_reason() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"\x20\x03\x00\x87\x00")  # 0x87 not authorized
        await writer.drain()

    async with fake_server(refuse) as port:
        conn = MqttConnection(OPTIONS, Recorder())
        with pytest.raises(ConnectionFailed, match=r"connection refused: not authorized \(0x87\)"):
            await conn.connect(Endpoint("127.0.0.1", port))


async def test_silent_broker_times_out_connect() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        await reader.read(1024)  # until the client gives up and closes

    async with fake_server(silent) as port:
        conn = MqttConnection(OPTIONS, Recorder())
        with pytest.raises(ConnectionFailed, match="no CONNACK"):
            await conn.connect(Endpoint("127.0.0.1", port), timeout=0.3)


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x01\x00\x01\x01",  # PUBACK: property length 1, no property
        b"\x00\x01\x00\x04\x02\x00\x00",  # message expiry cut short
        b"\x00\x01\x00\x03\x26\x00\x05",  # user property cut short
    ],
)
def test_truncated_properties_are_malformed_not_a_crash(body: bytes) -> None:
    with pytest.raises(codec.MalformedPacket):
        codec.decode_ack(codec.PUBACK, body, codec.PROTOCOL_5)


# ---- a broker that sends what it must not: bounded reads, protocol answers ---------------


class ChunkedBroker:
    """CONNACK with chosen properties, then ``size`` bytes of one PUBLISH written from a
    generator in 64 KiB pieces, then ``after`` (whole packets); records what it receives."""

    def __init__(self, head: bytes, size: int, after: bytes = b"", connack: bytes = b"") -> None:
        self.head, self.size, self.after = head, size, after
        self.connack = connack or b"\x20\x03\x00\x00\x00"
        self.received = bytearray()
        self._server = fake_server(self._serve)

    async def __aenter__(self) -> int:
        return await self._server.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await self._server.__aexit__(None, None, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received += await reader.read(1024)  # CONNECT
        listening = asyncio.ensure_future(self._listen(reader))
        try:
            writer.write(self.connack)
            if self.head:
                writer.write(self.head)
                piece = b"p" * 65536
                for sent in range(0, self.size, len(piece)):
                    writer.write(piece[: min(len(piece), self.size - sent)])
                    await writer.drain()
                writer.write(self.after)
            await writer.drain()
        finally:
            await listening

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                self.received += data


def publish_head(topic: bytes, size: int, packet_id: int) -> bytes:
    """The fixed header, topic and packet id of a QoS 1 MQTT 3.1.1 PUBLISH of ``size``
    payload bytes; the payload follows separately."""
    variable = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big")
    return b"\x32" + codec.encode_varint(len(variable) + size) + variable


async def test_oversize_publish_over_311_is_skipped_unbuffered_and_reported() -> None:
    """MQTT 3.1.1 cannot announce a size: the packet is skipped as it arrives, and
    reported as refused (topic and packet id only) in its place in line."""
    import tracemalloc

    options = SessionOptions(
        client_id="t", protocol=codec.PROTOCOL_311, clean_start=True, keepalive=0,
        maximum_packet_size=64 * 1024,
    )  # fmt: skip
    after = codec.encode_publish(b"t/after", b"ok", 1, False, 8, codec.PROTOCOL_311)
    recorder = Recorder()
    tracemalloc.start()
    try:
        async with ChunkedBroker(publish_head(b"t/big", 8 * 1024 * 1024, 7), 8 * 1024 * 1024,
                                 after) as port:  # fmt: skip
            conn = MqttConnection(options, recorder)
            await conn.connect(Endpoint("127.0.0.1", port))
            tracemalloc.reset_peak()
            for _ in range(500):
                if len(recorder.messages) == 2:
                    break
                await asyncio.sleep(0.01)
            peak = tracemalloc.get_traced_memory()[1]
            await conn.disconnect()
    finally:
        tracemalloc.stop()
    refused, normal = recorder.messages
    assert (refused.topic, refused.packet_id, refused.qos, refused.payload) == ("t/big", 7, 1, b"")
    assert refused.refused is not None
    # 1 + 4 (fixed header) + 2 + 5 (topic) + 2 (packet id) + 8 MiB
    assert refused.refused == "packet_too_large: 8388622 bytes > 65536 (payload not kept)"
    assert (normal.topic, normal.payload, normal.refused) == ("t/after", b"ok", None)
    assert peak < 1024 * 1024, peak  # 8 MiB went past; at most a few reads were held


async def test_oversize_packet_over_5_is_a_protocol_error_answered_with_0x95() -> None:
    options = SessionOptions(
        client_id="t", protocol=codec.PROTOCOL_5, clean_start=True, keepalive=0,
        maximum_packet_size=64 * 1024,
    )  # fmt: skip
    recorder = Recorder()
    # A MQTT 5 PUBLISH header (property length 0) announcing 200 MiB; 1 MiB of it is sent.
    head = publish_head(b"t/big", 200 * 1024 * 1024, 7) + b"\x00"
    broker = ChunkedBroker(head, 1024 * 1024)
    async with broker as port:
        conn = MqttConnection(options, recorder)
        await conn.connect(Endpoint("127.0.0.1", port))
        error = await asyncio.wait_for(recorder.lost, 5)
        for _ in range(100):
            if b"\xe0\x01\x95" in broker.received:
                break
            await asyncio.sleep(0.01)
    assert b"\xe0\x01\x95" in broker.received  # DISCONNECT: packet too large
    assert isinstance(error, ProtocolViolation)
    assert error.reason == "packet_too_large"
    assert "over the Maximum Packet Size 65536" in str(error)
    assert conn.protocol_error == "packet_too_large"
    assert recorder.messages == []


async def test_connect_announces_the_maximum_packet_size() -> None:
    options = SessionOptions(
        client_id="t", protocol=codec.PROTOCOL_5, clean_start=True, keepalive=0,
        maximum_packet_size=70000,
    )  # fmt: skip
    broker = ChunkedBroker(b"", 0)
    async with broker as port:
        conn = MqttConnection(options, Recorder())
        await conn.connect(Endpoint("127.0.0.1", port))
        await conn.disconnect()
    found = codec.split_packet(broker.received, 0)
    assert found is not None
    props, _ = codec.decode_properties(bytes(broker.received[found[1] : found[2]]), 10)
    assert props is not None
    assert props[codec.MAXIMUM_PACKET_SIZE] == 70000


@pytest.mark.parametrize(
    ("props", "reason"),
    [
        ({codec.RECEIVE_MAXIMUM: 0}, "receive_maximum_zero"),
        ({codec.MAXIMUM_QOS: 2}, "bad_maximum_qos"),
        ({codec.MAXIMUM_PACKET_SIZE: 0}, "bad_maximum_packet_size"),
        ({codec.RETAIN_AVAILABLE: 7}, "bad_retain"),
    ],
)
async def test_connack_protocol_errors_are_answered_with_0x82(
    props: dict[int, int], reason: str
) -> None:
    body = b"\x00\x00" + codec.encode_properties(props)
    broker = ChunkedBroker(b"", 0, connack=b"\x20" + codec.encode_varint(len(body)) + body)
    async with broker as port:
        conn = MqttConnection(OPTIONS, Recorder())
        with pytest.raises(ProtocolViolation, match="a protocol error") as caught:
            await conn.connect(Endpoint("127.0.0.1", port))
        for _ in range(100):
            if b"\xe0\x01\x82" in broker.received:
                break
            await asyncio.sleep(0.01)
    assert caught.value.reason == reason
    assert b"\xe0\x01\x82" in broker.received  # DISCONNECT: protocol error
    assert not conn.is_open


def test_packet_extent_knows_the_length_before_the_body() -> None:
    head = publish_head(b"t", 268_435_455 - 5, 1)
    assert codec.packet_extent(head, 0, 2) is None  # the length is not all in yet
    found = codec.packet_extent(head, 0, len(head))
    assert found is not None
    assert found[2] == 268_435_455 + 5  # known (and refusable) long before the body is in
    assert codec.publish_head(head, found[0], found[1], found[2], len(head)) == ("t", 1)
    assert codec.publish_head(head, found[0], found[1], found[2], len(head) - 1) is None
    with pytest.raises(codec.MalformedPacket):
        codec.packet_extent(b"\x30\xff\xff\xff\xff\x01", 0, 6)


@given(
    body=st.binary(max_size=60),
    after=st.binary(min_size=1, max_size=40),
    first=st.sampled_from([0x30, 0x32, 0x3B]),
)
def test_publish_decoded_in_place_reads_nothing_past_its_end(
    body: bytes, after: bytes, first: int
) -> None:
    """In a read buffer the next packet follows: decoding in place must give what the
    packet alone gives (the same message, or malformed), whatever bytes come after."""

    def decode(buf: bytes | bytearray, start: int) -> Publish | str:
        try:
            return codec.decode_publish_at(buf, first, start, start + len(body), codec.PROTOCOL_5)
        except codec.MalformedPacket:
            return "malformed"

    alone = decode(body, 0)
    assert decode(bytearray(b"\x00" + body + after), 1) == alone
    # Properties cut short by the packet's end, with valid property bytes after it.
    props = codec.encode_properties({codec.USER_PROPERTY: [("k", "v")]})
    assert decode(bytearray(b"\x00" + body + props), 1) == alone


def test_publish_properties_are_read_in_place_from_a_read_buffer() -> None:
    props = {
        codec.MESSAGE_EXPIRY: 3600,
        codec.CONTENT_TYPE: "application/json",
        codec.CORRELATION_DATA: b"\x01\x02",
        codec.SUBSCRIPTION_ID: [7, 300],
        codec.USER_PROPERTY: [("a", "1"), ("b", "2")],
    }
    payload = bytes(range(256)) * 20  # past the size where the payload is copied via a view
    one = codec.encode_publish(b"t/1", payload, 1, False, 9, codec.PROTOCOL_5, props)
    read = bytearray(one * 3)
    pos = 0
    while (found := codec.split_packet(read, pos)) is not None:
        first, start, pos = found
        msg = codec.decode_publish_at(read, first, start, pos, codec.PROTOCOL_5)
        assert (msg.topic, msg.payload, msg.packet_id, msg.properties) == ("t/1", payload, 9, props)
        assert type(msg.payload) is bytes
    del read[:pos]  # no view of the buffer is left behind: the reader can still trim it


def test_the_codec_benchmark_runs_its_cases() -> None:
    """bench/codec.py stays runnable (its figures are in bench/README.md); no timing asserted."""
    from bench import codec as bench_codec

    cases = bench_codec.codec_cases() | bench_codec.routing_cases(count=5)
    results = bench_codec.measure(cases, rounds=1, number=1)
    assert set(results) == set(cases)


async def test_a_long_batch_of_publishes_starts_leaving_before_it_ends() -> None:
    """One read can bring 1,000 messages; their copies are written every WRITE_BATCH
    packets, not all after the last is handled (which held the first ones back for
    milliseconds under load)."""
    import time

    from tests.fakes import FakeTarget

    with FakeTarget() as target:
        conn = MqttConnection(OPTIONS, Recorder())
        await conn.connect(Endpoint("127.0.0.1", target.port))
        for n in range(1000):  # one synchronous run, as within one read
            conn.publish(b"t", str(n).encode(), 0, False)
        # Still inside the run (the loop has not turned), yet the server has most of them.
        deadline = time.monotonic() + 5
        while len(target.accepted) < 900 and time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251 (blocking on purpose: no loop turn)
        assert len(target.accepted) >= 900
        for _ in range(500):
            if len(target.accepted) == 1000:
                break
            await asyncio.sleep(0.01)
        await conn.disconnect()
    assert [int(payload) for _, payload in target.accepted] == list(range(1000))
