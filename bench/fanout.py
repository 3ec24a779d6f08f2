"""Load over many topics: one raw MQTT 3.1.1 connection publishing numbered messages
round-robin over thousands of topics, paced.

``mosquitto_pub -l`` publishes to one topic per process, so 20,000 device topics would
need 20,000 processes. Here the publishes are encoded once, before the clock starts,
with the project's own codec (``bridge/mqtt_codec.py``), into one buffer; a thread then
writes the slice that is due every 2 ms, and another reads the PUBACKs (4 bytes each
with MQTT 3.1.1, so counting them is a length). Sending costs one ``sendall`` per tick,
so one process offers ~25k msg/s across 20k topics with CPU to spare.

Payloads are ``load.payload(<topic index>, <n>, size)``: the oracle (``load.account``)
then checks loss, duplicates and order per topic, the topic index standing in for the
publisher index of the C load.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from array import array

from bench import load
from bench.load import PublishResult
from bridge import mqtt_codec as codec

TICK = 0.002  # seconds between two writes of what is due


def encode(topics: list[str], per_topic: int, size: int, qos: int) -> tuple[bytes, array[int]]:
    """Every publish, round-robin over the topics; and where each one starts (plus the end)."""
    parts: list[bytes] = []
    offsets = array("Q", [0])
    end = 0
    names = [t.encode() for t in topics]
    k = 0
    for n in range(per_topic):
        for i, topic in enumerate(names):
            packet_id = k % 0xFFFF + 1 if qos else 0
            packet = codec.encode_publish(
                topic, load.payload(i, n, size), qos, False, packet_id, codec.PROTOCOL_311
            )
            parts.append(packet)
            end += len(packet)
            offsets.append(end)
            k += 1
    return b"".join(parts), offsets


def _connect(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        codec.encode_connect(
            client_id=client_id, protocol=codec.PROTOCOL_311, clean_start=True, keepalive=600
        )
    )
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        if not chunk:
            raise ConnectionError("the broker closed the connection before CONNACK")
        connack += chunk
    if connack[0] >> 4 != codec.CONNACK or connack[3] != 0:
        raise ConnectionError(f"CONNACK refused: {connack.hex()}")
    return sock


def publish(
    port: int,
    encoded: tuple[bytes, array[int]],
    topics: int,
    per_topic: int,
    qos: int,
    rate: float,
    client_id: str,
    timeout: float,
    begun: threading.Event | None = None,
) -> PublishResult:
    """What ``encode`` made (``per_topic`` messages on each of ``topics`` topics) at
    ``rate`` msg/s in total; returns when the broker acknowledged all of them (QoS 1) or
    all were written (QoS 0). ``begun`` is set when the first message leaves."""
    blob, offsets = encoded
    total = len(offsets) - 1
    sock = _connect(port, client_id)
    sock.settimeout(None)  # blocking: a busy broker may hold a write for seconds
    view = memoryview(blob)
    errors: list[str] = []
    acked = [0]
    deadline = time.monotonic() + timeout

    failed = threading.Event()

    def read_acks() -> None:
        want = 4 * total
        got = 0
        # select, not a socket timeout: that would apply to the writer's sendall too
        while got < want and time.monotonic() < deadline and not failed.is_set():
            try:
                if not select.select([sock], [], [], 0.5)[0]:
                    continue
                chunk = sock.recv(1 << 16)
            except OSError as exc:
                errors.append(f"reading PUBACKs failed: {exc}")
                break
            if not chunk:
                errors.append("the broker closed the connection")
                break
            got += len(chunk)
        acked[0] = got // 4

    reader = threading.Thread(target=read_acks, name="fanout-acks", daemon=True)
    if qos:
        reader.start()
    started = time.time()
    t0 = time.monotonic()
    sent = 0
    if begun is not None:
        begun.set()
    try:
        while sent < total and time.monotonic() < deadline:
            due = min(total, int((time.monotonic() - t0) * rate) + 1)
            if due > sent:
                sock.sendall(view[offsets[sent] : offsets[due]])
                sent = due
            time.sleep(TICK)
    except OSError as exc:
        errors.append(f"publishing failed after {sent} messages: {exc}")
        failed.set()
    written = time.time()
    if qos:
        reader.join(max(0.1, deadline - time.monotonic()))
        if acked[0] < total:
            errors.append(f"{acked[0]} of {total} acknowledged")
    else:
        acked[0] = sent
    finished = time.time() if qos else written
    with contextlib.suppress(OSError):
        sock.sendall(codec.encode_disconnect(codec.PROTOCOL_311))
    sock.close()
    counts = [per_topic] * topics
    result = PublishResult(started, finished, counts, not errors and sent == total, errors)
    if sent < total:
        result.errors.append(f"only {sent} of {total} written before the deadline")
    return result
