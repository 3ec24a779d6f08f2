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
from bridge.errors import ConnectionFailed
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
