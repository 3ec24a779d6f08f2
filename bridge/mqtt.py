"""One MQTT client connection on asyncio: the only module that speaks MQTT on a socket.

Why our own client instead of aiomqtt: the bridge's core promise needs a source
PUBLISH to be acknowledged only after its copy is acknowledged by the target, in
arrival order. aiomqtt 2.x acknowledges on receipt and has no public manual-ack API;
paho-mqtt (underneath it) has ``manual_ack`` but connects and handshakes TLS with
blocking calls, reads each packet with three ``recv`` syscalls and wakes a socket pair
per publish. Both measured far below Mosquitto's bridge (bench/README.md). This module is an
``asyncio.Protocol``: it parses every complete packet of a read in one go, coalesces
all packets written in one loop iteration into one ``write``, and never creates a
task per message. It implements only what a bridge uses: QoS 0 and 1, MQTT 3.1.1 and 5.

A connection never reconnects itself; its owner (source or target link) does.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from dataclasses import dataclass
from typing import Protocol, cast

import structlog

from bridge import mqtt_codec as codec
from bridge.errors import ConnectionFailed, ConnectRefused, PacketTooLarge, ProtocolViolation
from bridge.mqtt_codec import Properties, Publish
from bridge.policy import connack_violation

PACKET_TOO_LARGE = 0x95
# Packets written together at most. One read can bring up to Receive Maximum messages
# (1,000), and handling them takes milliseconds: the first copies should not wait
# for the last to be handled before they leave (p50 latency under load).
WRITE_BATCH = 64
PROTOCOL_ERROR = 0x82


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None

    def __str__(self) -> str:
        return f"{'mqtts' if self.ssl else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SessionOptions:
    client_id: str
    protocol: int  # codec.PROTOCOL_311 or codec.PROTOCOL_5
    clean_start: bool
    session_expiry: int = 0
    keepalive: int = 60
    receive_maximum: int | None = None
    username: str | None = None
    password: bytes | None = None
    # Published by the broker when this connection ends without DISCONNECT 0x00.
    will: codec.Will | None = None
    # The largest packet the broker may send us: announced (MQTT 5) and enforced on
    # every read, so memory is bounded by this, not by what a publisher sends.
    maximum_packet_size: int | None = None


class Listener(Protocol):
    """What a connection reports to its owner. Called synchronously from the reader."""

    def on_message(self, conn: MqttConnection, msg: Publish) -> bool:
        """Take a message; return False when there is no room, to be offered it again."""
        ...

    def on_puback(self, conn: MqttConnection, packet_id: int, reason_code: int) -> None: ...

    def on_writable(self, conn: MqttConnection, writable: bool) -> None:
        """The socket's send buffer crossed its high (False) or low (True) water mark."""
        ...

    def on_connection_lost(self, conn: MqttConnection, exc: BaseException | None) -> None: ...


class MqttConnection(asyncio.Protocol):
    """A single MQTT session over one TCP (or TLS) connection."""

    def __init__(self, options: SessionOptions, listener: Listener) -> None:
        self.options = options
        self.protocol = options.protocol
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._rbuf = bytearray()
        self._limit = options.maximum_packet_size or codec.MAX_PACKET
        # A refused PUBLISH (MQTT 3.1.1 only) whose bytes are still arriving: they are
        # dropped as they come, and the message is reported once they are gone.
        self._skip = 0
        self._refused: Publish | None = None
        self._wbuf: list[bytes] = []
        self._flush_scheduled = False
        self._held: Publish | None = None
        self._next_pid = 0
        self._unacked: set[int] = set()
        # QoS 1 packet ids taken from the broker and not yet acknowledged: a DUP=1
        # PUBLISH with one of them is the broker re-sending what we already have.
        self._inbound: set[int] = set()
        self.duplicates_ignored = 0
        self.ack_reason = ""  # the last PUBACK's reason string (MQTT 5), for its log line
        self._waiters: dict[int, asyncio.Future[codec.Ack]] = {}
        self._connack: asyncio.Future[codec.Ack] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._last_rx = self._last_tx = self._loop.time()
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self.session_present = False
        self.server_properties: Properties = {}
        self.disconnect_reason: int | None = None
        self.disconnect_detail = ""
        self._closing_error: ConnectionFailed | None = None
        self._keepalive = options.keepalive
        self._connected = False
        self._stopped = False
        self.max_qos = 1
        self.retain_available = True
        self.protocol_error: str | None = None  # the metric label of a peer's violation

    # ---- lifecycle -------------------------------------------------------------

    async def connect(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        """Open the socket, send CONNECT, wait for a successful CONNACK."""
        opts = self.options
        props: Properties = {}
        if opts.protocol == codec.PROTOCOL_5:
            if opts.session_expiry:
                props[codec.SESSION_EXPIRY] = opts.session_expiry
            if opts.receive_maximum:
                props[codec.RECEIVE_MAXIMUM] = opts.receive_maximum
            if opts.maximum_packet_size:
                props[codec.MAXIMUM_PACKET_SIZE] = opts.maximum_packet_size
        try:
            async with asyncio.timeout(timeout):
                await self._loop.create_connection(
                    lambda: self,
                    endpoint.host,
                    endpoint.port,
                    ssl=endpoint.ssl,
                    server_hostname=(endpoint.server_hostname or endpoint.host)
                    if endpoint.ssl
                    else None,
                )
                self._send(
                    codec.encode_connect(
                        client_id=opts.client_id,
                        protocol=opts.protocol,
                        clean_start=opts.clean_start,
                        keepalive=opts.keepalive,
                        username=opts.username,
                        password=opts.password,
                        properties=props,
                        will=opts.will,
                    )
                )
                ack = await self._connack
        except ConnectionFailed:
            self.abort()
            raise
        except ssl.SSLError as exc:
            self.abort()
            raise ConnectionFailed(
                f"TLS handshake with {endpoint} failed: {_ssl_reason(exc)}"
            ) from exc
        except TimeoutError as exc:
            self.abort()
            raise ConnectionFailed(f"no CONNACK from {endpoint} within {timeout:g} s") from exc
        except OSError as exc:
            self.abort()
            raise ConnectionFailed(f"cannot connect to {endpoint}: {exc.strerror or exc}") from exc
        code = ack.reason_codes[0]
        if code != 0:
            self.abort()
            reason = codec.reason_name(code, opts.protocol, connack=True)
            raise ConnectRefused(code, reason, codec.explain(ack.properties))
        self.session_present = ack.session_present
        self.server_properties = ack.properties or {}
        violation = connack_violation(self.server_properties)
        if violation is not None:
            self._violated(ProtocolViolation(violation[0], violation[1]), PROTOCOL_ERROR)
            raise ProtocolViolation(violation[0], violation[1])
        self._connected = True
        # What the server says it cannot take (MQTT 5 CONNACK): respected on publish.
        self.max_qos = int(self.server_properties.get(codec.MAXIMUM_QOS, 1))
        self.retain_available = bool(self.server_properties.get(codec.RETAIN_AVAILABLE, 1))
        server_keepalive = self.server_properties.get(codec.SERVER_KEEP_ALIVE)
        self._keepalive = server_keepalive if server_keepalive is not None else opts.keepalive
        if self._keepalive:
            self._keepalive_handle = self._loop.call_later(
                self._keepalive / 2, self._keepalive_tick
            )

    @property
    def is_open(self) -> bool:
        return self._connected and not self._closed.done()

    @property
    def closed_by_us(self) -> bool:
        """We ended it (keepalive timeout, protocol violation, internal error)."""
        return self._closing_error is not None

    @property
    def server_receive_maximum(self) -> int:
        return int(self.server_properties.get(codec.RECEIVE_MAXIMUM, 65535))

    @property
    def server_maximum_packet_size(self) -> int | None:
        value = self.server_properties.get(codec.MAXIMUM_PACKET_SIZE)
        return int(value) if value is not None else None

    async def disconnect(
        self, session_expiry: int | None = None, timeout: float = 2.0, with_will: bool = False
    ) -> None:
        """Send DISCONNECT (optionally changing the session expiry) and close.

        ``with_will`` (MQTT 5): reason 0x04, so the broker still publishes our Will
        after its delay unless this session reconnects first."""
        if self._transport is None or self._closed.done():
            return
        reason = codec.DISCONNECT_WITH_WILL if with_will else 0
        self._send(codec.encode_disconnect(self.protocol, session_expiry, reason))
        self._flush()
        self._transport.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._closed)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self._transport is not None and not self._closed.done():
            self._transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # ---- operations --------------------------------------------------------------

    def publish(
        self,
        topic: bytes,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | bytes | None = None,
    ) -> int:
        """Queue a PUBLISH; returns its packet id (0 for QoS 0). PUBACK comes via the listener.

        Raises PacketTooLarge, before anything is sent, when the server announced a
        smaller Maximum Packet Size (sending it would be a protocol error). The QoS is
        never lowered here: the owner refuses a server whose Maximum QoS is too low.
        """
        retain = retain and self.retain_available
        packet_id = self._next_free_packet_id() if qos else 0
        packet = codec.encode_publish(
            topic, payload, qos, retain, packet_id, self.protocol, properties
        )
        limit = self.server_maximum_packet_size
        if limit is not None and len(packet) > limit:
            raise PacketTooLarge(f"packet_too_large: {len(packet)} bytes > the target's {limit}")
        if packet_id:
            self._unacked.add(packet_id)
        self._send(packet)
        return packet_id

    def puback(self, packet_id: int) -> None:
        self._inbound.discard(packet_id)
        self._send(codec.encode_puback(packet_id))

    async def subscribe(
        self, filters: list[tuple[str, int]], retain_as_published: bool, timeout: float = 10.0
    ) -> list[int]:
        packet_id = self._allocate_packet_id()
        packet = codec.encode_subscribe(packet_id, filters, self.protocol, retain_as_published)
        ack = await self._request(packet_id, packet, timeout)
        return ack.reason_codes

    async def unsubscribe(self, filters: list[str], timeout: float = 10.0) -> list[int]:
        packet_id = self._allocate_packet_id()
        packet = codec.encode_unsubscribe(packet_id, filters, self.protocol)
        ack = await self._request(packet_id, packet, timeout)
        return ack.reason_codes

    def resume(self) -> None:
        """Offer the held message again and continue reading (after ``on_message`` said no)."""
        if self._held is not None and not self._stopped:
            self._loop.call_soon(self._resume_now)

    def stop_reading(self) -> None:
        """Take no more messages: bytes that arrive stay unread (the broker keeps them)."""
        self._stopped = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    @property
    def has_unread(self) -> bool:
        """Messages received but not processed (held, being skipped, or not yet parsed)."""
        return self._held is not None or bool(self._rbuf) or self._refused is not None

    # ---- internals ---------------------------------------------------------------

    def _next_free_packet_id(self) -> int:
        for _ in range(65535):
            self._next_pid = self._next_pid % 65535 + 1
            if self._next_pid not in self._unacked and self._next_pid not in self._waiters:
                return self._next_pid
        raise ProtocolViolation("all 65535 packet identifiers are in use")

    def _allocate_packet_id(self) -> int:
        packet_id = self._next_free_packet_id()
        self._unacked.add(packet_id)
        return packet_id

    async def _request(self, packet_id: int, packet: bytes, timeout: float) -> codec.Ack:
        self._unacked.discard(packet_id)
        waiter: asyncio.Future[codec.Ack] = self._loop.create_future()
        self._waiters[packet_id] = waiter
        self._send(packet)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError as exc:
            raise ConnectionFailed(f"no acknowledgement within {timeout:g} s") from exc
        finally:
            self._waiters.pop(packet_id, None)

    def _send(self, data: bytes) -> None:
        if self._transport is None or self._closed.done():
            return
        wbuf = self._wbuf
        wbuf.append(data)
        if len(wbuf) >= WRITE_BATCH:
            self._write()
        elif not self._flush_scheduled:
            # What is written during this loop iteration leaves in one write call.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what was queued now (paced publishes: the time counted is the write's)."""
        self._write()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        if self._wbuf and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(self._wbuf)  # one vectored write
            self._last_tx = self._loop.time()
        self._wbuf = []

    def _keepalive_tick(self) -> None:
        if self._closed.done():
            return
        now = self._loop.time()
        if now - self._last_tx >= self._keepalive / 2:
            self._send(codec.PINGREQ_PACKET)
        # While reading is paused the broker's answers wait unread: not a dead peer.
        if self._held is None and now - self._last_rx > self._keepalive * 1.5:
            self._closing_error = ConnectionFailed(
                f"no packet from the broker for {self._keepalive * 1.5:g} s (keepalive)"
            )
            self.abort()
            return
        self._keepalive_handle = self._loop.call_later(self._keepalive / 4, self._keepalive_tick)

    def _resume_now(self) -> None:
        held = self._held
        if held is None or self._closed.done() or self._stopped:
            return
        if not self._listener.on_message(self, held):
            return
        self._held = None
        # Reading was paused, so silence meant nothing: restart the keepalive clock.
        self._last_rx = self._loop.time()
        self._parse()
        if self._held is None and self._transport is not None:
            self._transport.resume_reading()

    def _parse(self) -> None:
        buf = self._rbuf
        size = len(buf)
        pos = 0
        limit = self._limit
        try:
            if self._refused is not None and not self._skip:
                # A refused packet's last byte has gone: it is next in line.
                refused, self._refused = self._refused, None
                self._on_publish(refused)
            split = codec.split_packet
            while self._held is None and (found := split(buf, pos, size)) is not None:
                first, start, end = found
                if end - pos > limit:  # it fit in one read, but it is still too large
                    pos = self._too_large(first, pos, start, end, size)
                    if self._closing_error is not None:
                        return
                    continue
                pos = end
                if first >> 4 == codec.PUBLISH:
                    self._on_publish(codec.decode_publish_at(buf, first, start, end, self.protocol))
                else:
                    self._dispatch(first, bytes(buf[start:end]))
            if self._held is None and pos < size:
                # An incomplete packet: refuse it by its announced length, before it is in.
                extent = codec.packet_extent(buf, pos, size)
                if extent is not None and extent[2] - pos > limit:
                    pos = self._too_large(extent[0], pos, extent[1], extent[2], size)
        except (codec.MalformedPacket, IndexError, struct.error) as exc:
            self._closing_error = ProtocolViolation(f"malformed packet from the broker: {exc}")
            self.protocol_error = "malformed_packet"
            self.abort()
        except Exception as exc:
            # A bug of ours must not vanish into asyncio's handler: say so and drop the
            # connection; what was not acknowledged comes back from the broker.
            structlog.get_logger().exception(
                "mqtt.internal_error", client_id=self.options.client_id
            )
            self._closing_error = ConnectionFailed(f"internal error: {exc!r}")
            self.abort()
        finally:
            if pos:
                del buf[:pos]

    def _too_large(self, first: int, pos: int, start: int, end: int, size: int) -> int:
        """A packet over our Maximum Packet Size; returns how far the buffer is consumed.

        MQTT 5 makes it a protocol error (DISCONNECT 0x95): a broker that honours the
        size we announced drops such a message on its side and never sends it. MQTT
        3.1.1 has no way to announce a size, so a PUBLISH is skipped as it arrives and
        reported as refused (the bridge dead-letters it without its payload and
        acknowledges it): the stream keeps flowing and nothing is buffered.
        """
        if self.protocol == codec.PROTOCOL_5 or first >> 4 != codec.PUBLISH:
            error = ProtocolViolation(
                f"the broker sent a packet of {end - pos} bytes, over the Maximum Packet "
                f"Size {self._limit} (max_packet_size)",
                "packet_too_large",
            )
            self._violated(error, PACKET_TOO_LARGE)
            return size
        head = codec.publish_head(self._rbuf, first, start, end, size)
        if head is None:
            return pos  # wait for the topic (at most 64 KiB), then skip the rest
        topic, packet_id = head
        if (first >> 1) & 0x03 == 2:
            raise codec.MalformedPacket("QoS 2 PUBLISH on a subscription granted QoS <= 1")
        refused = Publish(
            topic, b"", (first >> 1) & 0x03, bool(first & 0x01), bool(first & 0x08), packet_id,
            None, f"packet_too_large: {end - pos} bytes > {self._limit} (payload not kept)",
        )  # fmt: skip
        self._refused = refused
        if end <= size:
            self._refused = None
            self._on_publish(refused)
            return end
        self._skip = end - size
        return size

    def _violated(self, error: ProtocolViolation, reason_code: int) -> None:
        """The broker broke the protocol: say so (MQTT 5 DISCONNECT) and close."""
        self._closing_error = error
        self.protocol_error = error.reason
        if self._transport is None or self._transport.is_closing():
            return
        self._send(codec.encode_disconnect(self.protocol, reason_code=reason_code))
        self._flush()
        self._transport.close()

    def _on_publish(self, msg: Publish) -> None:
        if msg.qos == 2:
            raise codec.MalformedPacket("QoS 2 PUBLISH on a subscription granted QoS <= 1")
        if msg.qos:
            if msg.dup and msg.packet_id in self._inbound:
                self.duplicates_ignored += 1  # already taken on this connection
                return
            # Before the listener: it may acknowledge (and discard) it synchronously.
            self._inbound.add(msg.packet_id)
        if not self._listener.on_message(self, msg):
            self._held = msg
            if self._transport is not None:
                self._transport.pause_reading()

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == codec.PUBACK:
            ack = codec.decode_ack(kind, body, self.protocol)
            self._unacked.discard(ack.packet_id)
            self.ack_reason = codec.explain(ack.properties)
            self._listener.on_puback(self, ack.packet_id, ack.reason_codes[0])
            return
        if kind == codec.PINGRESP:
            return
        if kind in (codec.SUBACK, codec.UNSUBACK):
            ack = codec.decode_ack(kind, body, self.protocol)
            waiter = self._waiters.get(ack.packet_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(ack)
            return
        if kind == codec.CONNACK:
            ack = codec.decode_ack(kind, body, self.protocol)
            if not self._connack.done():
                self._connack.set_result(ack)
            return
        if kind == codec.DISCONNECT:
            ack = codec.decode_ack(kind, body, self.protocol)
            self.disconnect_reason = ack.reason_codes[0]
            self.disconnect_detail = codec.explain(ack.properties)
            return
        raise codec.MalformedPacket(f"unexpected packet type {kind}")

    # ---- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    @property
    def last_rx(self) -> float:
        """Event-loop time of the last bytes from the broker."""
        return self._last_rx

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        if self._closing_error is not None:
            return  # we are hanging up on this peer
        if self._skip:
            # The bytes of a refused packet: dropped as they come, never buffered.
            n = min(self._skip, len(data))
            self._skip -= n
            if self._skip:
                return
            data = data[n:]
        self._rbuf += data
        if self._held is None and not self._stopped:
            self._parse()

    def pause_writing(self) -> None:
        self._listener.on_writable(self, False)

    def resume_writing(self) -> None:
        self._listener.on_writable(self, True)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed.done():
            return
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        error: BaseException | None = self._closing_error
        if error is None and self.disconnect_reason is not None:
            code = self.disconnect_reason
            detail = f" ({self.disconnect_detail})" if self.disconnect_detail else ""
            error = ConnectionFailed(
                f"broker disconnected us: {codec.reason_name(code)} (0x{code:02x}){detail}"
            )
        if error is None and exc is not None:
            error = ConnectionFailed(f"connection lost: {exc}")
        self._closed.set_result(None)
        if not self._connack.done():
            self._connack.set_exception(
                error or ConnectionFailed("connection closed before CONNACK")
            )
            self._connack.exception()  # mark retrieved: connect() may already be gone
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(error or ConnectionFailed("connection closed"))
        self._listener.on_connection_lost(self, error)


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Name the setting to look at: the operator reads this line at 3 a.m.
        hint = (
            "check tls.server_name"
            if "Hostname mismatch" in str(exc.verify_message)
            else ("check tls.ca_file and the broker's certificate dates")
        )
        return f"certificate verify failed: {exc.verify_message} ({hint})"
    return exc.reason or str(exc)
