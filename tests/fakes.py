"""Peers a real broker cannot play on demand: a fake MQTT 5 target that answers with
chosen reason codes (and CONNACK properties), a fake source that sends PUBLISH packets
no real broker would (bad topics, aliases, oversize), and a proxy that timestamps every
PUBLISH a client sends.

Both run their own event loop in a thread, so blocking test code can drive them.
They use the bridge's framing function only to split the byte stream into packets;
what they record (topics, payloads, times) is checked by the test's own oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bridge import mqtt_codec as codec
from tests.harness import free_port, wait_until


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def _client_id(connect_body: bytes) -> str:
    # Variable header: protocol name (2+4), level, flags, keepalive; then v5 properties.
    pos = 2 + 4 + 1 + 1 + 2
    level = connect_body[6]
    if level == codec.PROTOCOL_5:
        length, pos = codec.decode_varint(connect_body, pos) or (0, pos)
        pos += length
    (size,) = struct.unpack_from("!H", connect_body, pos)
    return connect_body[pos + 2 : pos + 2 + size].decode()


class _FakeServer:
    """A loopback MQTT server on its own event-loop thread, for blocking test code: start
    and stop, its URL, and the client's byte stream cut into packets. A subclass answers."""

    port: int
    _runner: _LoopThread
    _writers: list[asyncio.StreamWriter]

    def __enter__(self) -> Self:
        self._runner.start()
        self._server = self._runner.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.call(self._stop())
        self._runner.stop()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def _start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _stop(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @staticmethod
    async def _packets(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(first byte, body) of every packet the client sends; answers are flushed after
        each read's packets."""
        buf = bytearray()
        while data := await reader.read(65536):
            buf += data
            while (found := codec.split_packet(buf, 0)) is not None:
                first, start, end = found
                body = bytes(buf[start:end])
                del buf[:end]
                yield first, body
            await writer.drain()


Decision = int | tuple[str, int]  # a PUBACK reason code, or ("disconnect", reason code)


@dataclass
class FakeTarget(_FakeServer):
    """An MQTT 5 server that acknowledges each PUBLISH with ``decide(n, topic, payload)``.

    It grants every SUBSCRIBE at QoS 0 and delivers an accepted PUBLISH to the
    connections subscribed to exactly its topic (no wildcards): enough for a reader.
    """

    decide: Callable[[int, str, bytes], Decision] = lambda n, topic, payload: 0
    receive_maximum: int = 100
    # More CONNACK properties (property id -> value), e.g. {MAXIMUM_QOS: 0}.
    connack: dict[int, Any] = field(default_factory=dict)
    accepted: list[tuple[str, bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    connects: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._runner = _LoopThread()
        self._published = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._subscribers: dict[str, list[asyncio.StreamWriter]] = defaultdict(list)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            async for first, body in self._packets(reader, writer):
                if not self._handle(first, body, writer):
                    await self._hang_up(reader, writer)
                    return
        except ConnectionError:
            pass
        finally:
            for readers in self._subscribers.values():
                if writer in readers:
                    readers.remove(writer)
            writer.close()

    @staticmethod
    async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Half-close and read until the client closes: closing with unread bytes would
        # send a reset that can destroy the DISCONNECT before the client reads it.
        await writer.drain()
        writer.write_eof()
        try:
            async with asyncio.timeout(2):
                while await reader.read(65536):
                    pass
        except TimeoutError:
            pass

    def _handle(self, first: int, body: bytes, writer: asyncio.StreamWriter) -> bool:
        kind = first >> 4
        if kind == codec.CONNECT:
            self.connects.append(_client_id(body))
            props = codec.encode_properties(
                {codec.RECEIVE_MAXIMUM: self.receive_maximum, **self.connack}
            )
            payload = b"\x00\x00" + props
            writer.write(bytes((0x20,)) + codec.encode_varint(len(payload)) + payload)
        elif kind == codec.PUBLISH:
            msg = codec.decode_publish(first, body, codec.PROTOCOL_5)
            decision = self.decide(self._published, msg.topic, msg.payload)
            self._published += 1
            if isinstance(decision, tuple):
                # DISCONNECT with a reason code and no properties, then hang up.
                writer.write(bytes((0xE0, 2, decision[1], 0)))
                return False
            self.answers.append(decision)
            if decision < 0x80:
                self.accepted.append((msg.topic, msg.payload))
                for reader in self._subscribers.get(msg.topic, []):
                    reader.write(
                        codec.encode_publish(
                            msg.topic.encode(), msg.payload, 0, False, 0, codec.PROTOCOL_5
                        )
                    )
            if msg.qos:
                writer.write(b"\x40\x03" + struct.pack("!H", msg.packet_id) + bytes((decision,)))
        elif kind == codec.SUBSCRIBE:
            (packet_id,) = struct.unpack_from("!H", body)
            length, pos = codec.decode_varint(body, 2) or (0, 2)
            pos += length  # properties
            codes = b""
            while pos < len(body):
                (size,) = struct.unpack_from("!H", body, pos)
                self._subscribers[body[pos + 2 : pos + 2 + size].decode()].append(writer)
                pos += 2 + size + 1  # the filter, then its options byte
                codes += b"\x00"
            payload = struct.pack("!H", packet_id) + b"\x00" + codes
            writer.write(bytes((0x90,)) + codec.encode_varint(len(payload)) + payload)
        elif kind == codec.PINGREQ:
            writer.write(b"\xd0\x00")
        elif kind == codec.DISCONNECT:
            return False
        return True


@dataclass
class FakeSource(_FakeServer):
    """An MQTT 5 server that answers every SUBSCRIBE, then sends ``script`` (raw packets,
    once, to the first subscriber) and records what the client answers."""

    script: list[bytes] = field(default_factory=list)
    connects: list[bytes] = field(default_factory=list)  # CONNECT bodies
    pubacks: list[int] = field(default_factory=list)
    disconnects: list[int] = field(default_factory=list)  # DISCONNECT reason codes
    port: int = 0

    def __post_init__(self) -> None:
        self._runner = _LoopThread()
        self._sent = False
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            async for first, body in self._packets(reader, writer):
                await self._handle(first >> 4, body, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, kind: int, body: bytes, writer: asyncio.StreamWriter) -> None:
        if kind == codec.CONNECT:
            self.connects.append(body)
            writer.write(b"\x20\x03\x00\x00\x00")  # success, no properties
        elif kind == codec.SUBSCRIBE:
            payload = body[:2] + b"\x00" + bytes([1] * _filters(body))  # all granted QoS 1
            writer.write(bytes((0x90,)) + codec.encode_varint(len(payload)) + payload)
            await writer.drain()
            if not self._sent:
                self._sent = True
                for packet in self.script:
                    writer.write(packet)
                    await writer.drain()
        elif kind == codec.UNSUBSCRIBE:
            writer.write(b"\xb0\x03" + body[:2] + b"\x00")
        elif kind == codec.PUBACK:
            self.pubacks.append(struct.unpack_from("!H", body)[0])
        elif kind == codec.PINGREQ:
            writer.write(b"\xd0\x00")
        elif kind == codec.DISCONNECT:
            self.disconnects.append(body[0] if body else 0)
        await writer.drain()


def _filters(subscribe_body: bytes) -> int:
    """How many topic filters an MQTT 5 SUBSCRIBE carries."""
    length, pos = codec.decode_varint(subscribe_body, 2) or (0, 2)
    pos += length
    count = 0
    while pos < len(subscribe_body):
        (size,) = struct.unpack_from("!H", subscribe_body, pos)
        pos += 2 + size + 1
        count += 1
    return count


def publish_packet(
    topic: bytes, payload: bytes, packet_id: int, properties: dict[int, Any] | None = None
) -> bytes:
    """A QoS 1 MQTT 5 PUBLISH with any topic bytes, valid or not (the codec checks nothing
    when encoding)."""
    return codec.encode_publish(topic, payload, 1, False, packet_id, codec.PROTOCOL_5, properties)


class CountingProxy:
    """A TCP proxy that records when each client (by MQTT client id) sent each PUBLISH.

    It runs as its own process: timestamps taken in a thread of the test process would
    bunch up whenever the test's other threads hold the interpreter lock.
    """

    def __init__(self, upstream_port: int, workdir: Path) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.publishes: dict[str, list[float]] = {}
        self._out = workdir / f"proxy-{self.port}.json"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CountingProxy:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fakes",
                str(self.port),
                str(self.upstream_port),
                str(self._out),
            ],
            cwd=Path(__file__).resolve().parent.parent,
        )
        wait_until(self._listening, 10, what="the counting proxy")
        return self

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        self._proc.wait(10)
        self.publishes = json.loads(self._out.read_text())

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


async def _proxy_main(port: int, upstream: int, out: Path) -> None:
    publishes: dict[str, list[float]] = defaultdict(list)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
        buf = bytearray()
        client = "?"
        try:
            while data := await reader.read(65536):
                now = time.monotonic()
                writer.write(data)
                if count:
                    buf += data
                    while (found := codec.split_packet(buf, 0)) is not None:
                        first, start, end = found
                        if first >> 4 == codec.CONNECT:
                            client = _client_id(bytes(buf[start:end]))
                        elif first >> 4 == codec.PUBLISH:
                            publishes[client].append(now)
                        del buf[:end]
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    await stop.wait()
    server.close()
    await asyncio.to_thread(out.write_text, json.dumps(publishes))


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events inside any interval of ``window`` seconds."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


if __name__ == "__main__":
    asyncio.run(_proxy_main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
