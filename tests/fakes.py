"""Peers a real broker cannot play on demand: a fake MQTT 5 target that answers with
chosen reason codes, and a proxy that timestamps every PUBLISH a client sends.

Both run their own event loop in a thread, so blocking test code can drive them.
They use the bridge's framing helpers only to split the byte stream into packets;
what they record (topics, payloads, times) is checked by the test's own oracle.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from bridge import mqtt_codec as codec


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


Decision = int | tuple[str, int]  # a PUBACK reason code, or ("disconnect", reason code)


@dataclass
class FakeTarget:
    """An MQTT 5 server that acknowledges each PUBLISH with ``decide(n, topic, payload)``."""

    decide: Callable[[int, str, bytes], Decision] = lambda n, topic, payload: 0
    receive_maximum: int = 100
    accepted: list[tuple[str, bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    connects: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._runner = _LoopThread()
        self._published = 0
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> FakeTarget:
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
        self._writers.append(writer)
        buf = bytearray()
        try:
            while data := await reader.read(65536):
                buf += data
                while (found := codec.split_packet(buf, 0)) is not None:
                    first, start, end = found
                    body = bytes(buf[start:end])
                    del buf[:end]
                    if not self._handle(first, body, writer):
                        await self._hang_up(reader, writer)
                        return
                await writer.drain()
        except ConnectionError:
            pass
        finally:
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
            props = codec.encode_properties({codec.RECEIVE_MAXIMUM: self.receive_maximum})
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
            if msg.qos:
                writer.write(b"\x40\x03" + struct.pack("!H", msg.packet_id) + bytes((decision,)))
        elif kind == codec.PINGREQ:
            writer.write(b"\xd0\x00")
        elif kind == codec.DISCONNECT:
            return False
        return True


class CountingProxy:
    """A TCP proxy that records when each client (by MQTT client id) sent each PUBLISH."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.publishes: dict[str, list[float]] = defaultdict(list)
        self.port = 0
        self._runner = _LoopThread()
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> CountingProxy:
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
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, count=True), self._pipe(up_reader, writer, count=False)
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool
    ) -> None:
        buf = bytearray()
        client = "?"
        try:
            while data := await reader.read(65536):
                writer.write(data)
                if count:
                    buf += data
                    now = time.monotonic()
                    while (found := codec.split_packet(buf, 0)) is not None:
                        first, start, end = found
                        if first >> 4 == codec.CONNECT:
                            client = _client_id(bytes(buf[start:end]))
                        elif first >> 4 == codec.PUBLISH:
                            self.publishes[client].append(now)
                        del buf[:end]
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events inside any interval of ``window`` seconds."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
