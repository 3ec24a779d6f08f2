"""MQTT 3.1.1 and 5 packet encoding and decoding: pure functions, no I/O.

Only the client side of the protocol is here (what a bridge sends and receives).
Properties travel as ``dict[int, Any]`` keyed by property identifier; the user
property (0x26) is a list of ``(key, value)`` pairs and the subscription identifier
(0x0B) a list of ints, because both may repeat.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

PROTOCOL_311 = 4
PROTOCOL_5 = 5
# The largest packet MQTT can express: a 268,435,455 byte body and its fixed header.
MAX_PACKET = 268_435_455 + 5

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

# Property identifiers (MQTT 5, section 2.2.2.2).
PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
WILL_DELAY = 0x18
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27

_BYTE, _INT16, _INT32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES: dict[int, int] = {
    0x01: _BYTE, 0x02: _INT32, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY,
    0x0B: _VARINT, 0x11: _INT32, 0x12: _UTF8, 0x13: _INT16, 0x15: _UTF8,
    0x16: _BINARY, 0x17: _BYTE, 0x18: _INT32, 0x19: _BYTE, 0x1A: _UTF8,
    0x1C: _UTF8, 0x1F: _UTF8, 0x21: _INT16, 0x22: _INT16, 0x23: _INT16,
    0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _INT32, 0x28: _BYTE,
    0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
_REPEATABLE = frozenset({USER_PROPERTY, SUBSCRIPTION_ID})

Properties = dict[int, Any]

_U16 = struct.Struct("!H")
_SMALL_VARINTS = [bytes((i,)) for i in range(128)]
_U32 = struct.Struct("!I")


class MalformedPacket(ValueError):
    """The peer sent bytes that are not a valid MQTT packet."""


def encode_varint(value: int) -> bytes:
    if value < 128:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """Return ``(value, next_pos)``, or None when the buffer ends inside the integer."""
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return _U16.pack(len(raw)) + raw


def _binary(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def encode_properties(props: Properties | None) -> bytes:
    if not props:
        return b"\x00"
    body = bytearray()
    for ident, value in props.items():
        kind = _PROPERTY_TYPES[ident]
        values = value if ident in _REPEATABLE else (value,)
        for item in values:
            body.append(ident)
            if kind == _BYTE:
                body.append(item)
            elif kind == _INT16:
                body += _U16.pack(item)
            elif kind == _INT32:
                body += _U32.pack(item)
            elif kind == _VARINT:
                body += encode_varint(item)
            elif kind == _UTF8:
                body += _utf8(item)
            elif kind == _BINARY:
                body += _binary(item)
            else:
                body += _utf8(item[0]) + _utf8(item[1])
    return encode_varint(len(body)) + bytes(body)


def _read_u16(buf: bytes, pos: int) -> int:
    if pos + 2 > len(buf):
        raise MalformedPacket("packet ends inside a two-byte integer")
    return int(_U16.unpack_from(buf, pos)[0])


Buffer = bytes | bytearray


def decode_properties(
    buf: Buffer, pos: int, limit: int | None = None
) -> tuple[Properties | None, int]:
    """The property list at ``pos``, read in place: ``(properties, next_pos)``. ``limit``
    is where the packet ends (default: the buffer's end); nothing past it is read."""
    try:
        return _decode_properties(buf, pos, len(buf) if limit is None else limit)
    except (IndexError, struct.error) as exc:
        raise MalformedPacket(f"property list cut short ({exc})") from None
    except UnicodeDecodeError as exc:  # here, not per string: the loop stays call-free
        raise MalformedPacket("string is not valid UTF-8") from exc


def _decode_properties(buf: Buffer, pos: int, limit: int) -> tuple[Properties | None, int]:
    if pos < limit and buf[pos] < 0x80:  # a one-byte length: any list under 128 bytes
        length = buf[pos]
        pos += 1
    else:
        decoded = decode_varint(buf, pos)
        if decoded is None or decoded[1] > limit:
            raise MalformedPacket("packet ends inside the property length")
        length, pos = decoded
    end = pos + length
    if end > limit:
        raise MalformedPacket("property length beyond the packet")
    if length == 0:
        return None, pos
    props: Properties = {}
    types = _PROPERTY_TYPES
    while pos < end:
        ident = buf[pos]
        kind = types.get(ident)
        if kind is None:
            raise MalformedPacket(f"unknown property 0x{ident:02x}")
        pos += 1
        value: Any
        if kind >= _UTF8:  # strings, binary data and pairs: a two-byte length first
            if pos + 2 > end:
                raise MalformedPacket("property list ends inside a string length")
            stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            if stop > end:
                raise MalformedPacket("property list ends inside a string")
            if kind == _BINARY:
                value = bytes(buf[pos + 2 : stop])
            else:
                value = buf[pos + 2 : stop].decode()
                if kind == _PAIR:
                    pos = stop
                    if pos + 2 > end:
                        raise MalformedPacket("property list ends inside a string length")
                    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
                    if stop > end:
                        raise MalformedPacket("property list ends inside a string")
                    value = (value, buf[pos + 2 : stop].decode())
            pos = stop
        elif kind == _BYTE:
            value = buf[pos]
            pos += 1
        elif kind == _INT32:
            if pos + 4 > end:
                raise MalformedPacket("property list ends inside a four-byte integer")
            value = _U32.unpack_from(buf, pos)[0]
            pos += 4
        elif kind == _INT16:
            if pos + 2 > end:
                raise MalformedPacket("property list ends inside a two-byte integer")
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        else:  # _VARINT
            got = decode_varint(buf, pos)
            if got is None or got[1] > end:
                raise MalformedPacket("property list ends inside a variable byte integer")
            value, pos = got
        if ident in _REPEATABLE:
            props.setdefault(ident, []).append(value)
        else:
            props[ident] = value
    if pos != end:
        raise MalformedPacket("property list overruns its length")
    return props, end


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for us when we go away without DISCONNECT 0x00
    (MQTT 5: after ``delay`` seconds, unless the session reconnects first)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    delay: int = 0  # Will Delay Interval (MQTT 5 only)


def encode_connect(
    *,
    client_id: str,
    protocol: int,
    clean_start: bool,
    keepalive: int,
    username: str | None = None,
    password: bytes | None = None,
    properties: Properties | None = None,
    will: Will | None = None,
) -> bytes:
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = _utf8("MQTT") + bytes((protocol, flags)) + _U16.pack(keepalive)
    if protocol == PROTOCOL_5:
        body += encode_properties(properties)
    body += _utf8(client_id)
    if will is not None:
        if protocol == PROTOCOL_5:
            body += encode_properties({WILL_DELAY: will.delay} if will.delay else None)
        body += _utf8(will.topic) + _binary(will.payload)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        body += _binary(password)
    return _packet(CONNECT << 4, body)


def encode_publish(
    topic: bytes,
    payload: bytes,
    qos: int,
    retain: bool,
    packet_id: int,
    protocol: int,
    properties: Properties | bytes | None = None,
    dup: bool = False,
) -> bytes:
    """``properties`` may be already encoded (length prefix included): the hot path
    reuses one encoded block for every message that carries only the hop marker."""
    first = (PUBLISH << 4) | (dup << 3) | (qos << 1) | retain
    parts = [b"", _U16.pack(len(topic)), topic]
    if qos:
        parts.append(_U16.pack(packet_id))
    if protocol == PROTOCOL_5:
        parts.append(properties if isinstance(properties, bytes) else encode_properties(properties))
    parts.append(payload)
    length = sum(map(len, parts))
    parts[0] = bytes((first,)) + encode_varint(length)
    return b"".join(parts)


def encode_puback(packet_id: int) -> bytes:
    # Reason code omitted: "success" is implied (MQTT 5, 3.4.2.1) and 3.1.1 has none.
    return b"\x40\x02" + _U16.pack(packet_id)


def encode_subscribe(
    packet_id: int,
    filters: list[tuple[str, int]],
    protocol: int,
    retain_as_published: bool = False,
) -> bytes:
    body = _U16.pack(packet_id)
    if protocol == PROTOCOL_5:
        body += b"\x00"
    for topic_filter, qos in filters:
        options = qos
        if protocol == PROTOCOL_5:
            # Retain Handling 1: retained messages only for a new subscription, not again
            # on every reconnect (a BTD would re-send old commands to devices).
            options |= 0x10
            if retain_as_published:
                options |= 0x08
        body += _utf8(topic_filter) + bytes((options,))
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def encode_unsubscribe(packet_id: int, filters: list[str], protocol: int) -> bytes:
    body = _U16.pack(packet_id)
    if protocol == PROTOCOL_5:
        body += b"\x00"
    for topic_filter in filters:
        body += _utf8(topic_filter)
    return _packet((UNSUBSCRIBE << 4) | 0x02, body)


PINGREQ_PACKET = b"\xc0\x00"


# DISCONNECT reason: the broker publishes our Will (after its delay) instead of dropping it.
DISCONNECT_WITH_WILL = 0x04


def encode_disconnect(
    protocol: int, session_expiry: int | None = None, reason_code: int = 0
) -> bytes:
    if protocol != PROTOCOL_5 or (session_expiry is None and not reason_code):
        return b"\xe0\x00"
    if session_expiry is None:
        # Remaining Length 1: the property length may be left out (MQTT 5, 3.14.2.2).
        return _packet(DISCONNECT << 4, bytes((reason_code,)))
    props = encode_properties({SESSION_EXPIRY: session_expiry})
    return _packet(DISCONNECT << 4, bytes((reason_code,)) + props)


@dataclass(slots=True)
class Publish:
    """An incoming PUBLISH; the payload is the exact bytes the broker sent."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    properties: Properties | None
    # Set when the connection refused the packet (larger than it may buffer): the
    # payload was skipped, unread; only the topic and packet id are known.
    refused: str | None = None


@dataclass(slots=True)
class Ack:
    """CONNACK, PUBACK, SUBACK, UNSUBACK or DISCONNECT: an id, reason codes, properties."""

    kind: int
    packet_id: int
    reason_codes: list[int]
    properties: Properties | None
    session_present: bool = False


def split_packet(
    buf: bytes | bytearray, pos: int, size: int | None = None
) -> tuple[int, int, int] | None:
    """Frame the packet starting at ``pos`` of ``buf[:size]``: ``(first_byte, body_start,
    body_end)``, or None until all of it has arrived. The one framing function."""
    if size is None:
        size = len(buf)
    if size - pos < 2:
        return None
    length = buf[pos + 1]
    if length < 128:  # a one-byte remaining length: most packets
        start = pos + 2
    else:
        found = decode_varint(buf, pos + 1)
        if found is None:
            return None
        length, start = found
    end = start + length
    if end > size:
        return None
    return buf[pos], start, end


def packet_extent(buf: bytes | bytearray, pos: int, size: int) -> tuple[int, int, int] | None:
    """Like ``split_packet``, but as soon as the fixed header is in: ``(first_byte,
    body_start, packet_end)`` with ``packet_end`` possibly beyond ``size``. Lets a reader
    refuse a packet by its announced length before buffering it."""
    length = shift = 0
    for i in range(pos + 1, pos + 5):
        if i >= size:
            return None
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return buf[pos], i + 1, i + 1 + length
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def publish_head(
    buf: bytes | bytearray, first: int, start: int, end: int, size: int
) -> tuple[str, int] | None:
    """Topic and packet id of a PUBLISH whose body starts at ``start`` and ends at
    ``end``, of which ``buf[:size]`` has arrived; None until they are in. At most
    65,539 bytes of the body are needed, whatever the packet's length."""
    if size - start < 2:
        return None
    head_end = start + 2 + ((buf[start] << 8) | buf[start + 1])
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    pid_end = head_end + (2 if qos else 0)
    if pid_end > end:
        raise MalformedPacket("packet ends inside the topic")
    if pid_end > size:
        return None
    try:
        topic = bytes(buf[start + 2 : head_end]).decode()
    except UnicodeDecodeError as exc:
        raise MalformedPacket("topic is not valid UTF-8") from exc
    packet_id = (buf[head_end] << 8) | buf[head_end + 1] if qos else 0
    return topic, packet_id


def decode_publish(first: int, body: bytes, protocol: int) -> Publish:
    return decode_publish_at(body, first, 0, len(body), protocol)


def decode_publish_at(buf: Buffer, first: int, start: int, end: int, protocol: int) -> Publish:
    """Decode a PUBLISH in place: properties are read where they lie, and only the topic,
    the payload and the property values are copied (the payload once)."""
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    if end - start < 2:
        raise MalformedPacket("PUBLISH too short")
    topic_end = start + 2 + ((buf[start] << 8) | buf[start + 1])
    if topic_end > end:
        raise MalformedPacket("packet ends inside the topic")
    try:
        topic = buf[start + 2 : topic_end].decode()
    except UnicodeDecodeError as exc:
        raise MalformedPacket("topic is not valid UTF-8") from exc
    pos = topic_end
    packet_id = 0
    if qos:
        if pos + 2 > end:
            raise MalformedPacket("packet ends inside the packet identifier")
        packet_id = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
    props = None
    if protocol == PROTOCOL_5:
        if pos < end and buf[pos] == 0:
            pos += 1  # the common case: no properties
        else:
            props, pos = decode_properties(buf, pos, end)
    if end - pos <= 4096 or type(buf) is bytes:
        payload = bytes(buf[pos:end])  # under 4 KiB a second copy costs less than a view
    else:
        # Slicing a bytearray copies, and bytes() copies again: a view makes it one copy.
        with memoryview(buf) as view:
            payload = bytes(view[pos:end])
    return Publish(topic, payload, qos, bool(first & 0x01), bool(first & 0x08), packet_id, props)


def decode_ack(kind: int, body: bytes, protocol: int) -> Ack:
    """Decode the acknowledgement-like packets the server sends to a client."""
    v5 = protocol == PROTOCOL_5
    if kind == CONNACK:
        if len(body) < 2:
            raise MalformedPacket("CONNACK too short")
        props = decode_properties(body, 2)[0] if v5 and len(body) > 2 else None
        return Ack(kind, 0, [body[1]], props, session_present=bool(body[0] & 0x01))
    if kind == DISCONNECT:
        code = body[0] if body else 0
        props = decode_properties(body, 1)[0] if v5 and len(body) > 1 else None
        return Ack(kind, 0, [code], props)
    packet_id = _read_u16(body, 0)
    pos = 2
    props = None
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        code = body[2] if v5 and len(body) > 2 else 0
        if v5 and len(body) > 3:
            props = decode_properties(body, 3)[0]
        return Ack(kind, packet_id, [code], props)
    if v5:
        props, pos = decode_properties(body, pos)
    # SUBACK lists one code per filter; UNSUBACK in 3.1.1 has none (success).
    return Ack(kind, packet_id, list(body[pos:]), props)


SESSION_TAKEN_OVER = 0x8E

REASON_NAMES: dict[int, str] = {
    0x00: "success", 0x04: "disconnect with will", 0x10: "no matching subscribers",
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy",
    0x8A: "banned", 0x8B: "server shutting down", 0x8C: "bad authentication method",
    0x8D: "keep alive timeout", 0x8E: "session taken over", 0x8F: "topic filter invalid",
    0x90: "topic name invalid", 0x91: "packet identifier in use",
    0x93: "receive maximum exceeded", 0x94: "topic alias invalid",
    0x95: "packet too large", 0x96: "message rate too high", 0x97: "quota exceeded",
    0x98: "administrative action", 0x99: "payload format invalid",
    0x9A: "retain not supported", 0x9B: "qos not supported", 0x9C: "use another server",
    0x9D: "server moved", 0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded", 0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported", 0xA2: "wildcard subscriptions not supported",
}  # fmt: skip

# MQTT 3.1.1 CONNACK return codes (3.2.2.3) mean other things than MQTT 5 reason codes.
CONNACK_311_NAMES: dict[int, str] = {
    1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorized",
}  # fmt: skip


def explain(props: Properties | None) -> str:
    """The reason string (0x1F) and server reference (0x1C) a server sent, for a log line."""
    if not props:
        return ""
    parts = []
    if REASON_STRING in props:
        parts.append(f"server says: {props[REASON_STRING]}")
    if SERVER_REFERENCE in props:
        parts.append(f"server reference: {props[SERVER_REFERENCE]}")
    return "; ".join(parts)


def reason_name(code: int, protocol: int = PROTOCOL_5, connack: bool = False) -> str:
    if connack and protocol == PROTOCOL_311:
        return CONNACK_311_NAMES.get(code, f"refused ({code})")
    return REASON_NAMES.get(code, f"reason 0x{code:02x}")
