"""The `mqtt5` package (Rust, MQTT 5 only) on the shapes of ``bench/codec.py``.

Imported only by ``python -m bench.codec --mqtt5``, in a venv that has the package
(``pip install mqtt5``): the bridge does not depend on it. Its packets are objects of its
own, so the figures that count for us include the conversion to and from our
``Publish`` and property dict (``… via our Publish``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mqtt5

from bridge import mqtt_codec as codec
from bridge.mqtt_codec import Properties, Publish

# Their attribute for each of our property identifiers (the PUBLISH ones).
_NAMES = {
    codec.PAYLOAD_FORMAT: "payload_format_indicator",
    codec.MESSAGE_EXPIRY: "message_expiry_interval",
    codec.CONTENT_TYPE: "content_type",
    codec.RESPONSE_TOPIC: "response_topic",
    codec.CORRELATION_DATA: "correlation_data",
    codec.SUBSCRIPTION_ID: "subscription_ids",
    codec.TOPIC_ALIAS: "topic_alias",
    codec.USER_PROPERTY: "user_properties",
}


def to_publish(packet: Any) -> Publish:
    """Their PublishPacket as our Publish: what the bridge's reader would have to do."""
    props: Properties = {}
    if packet.payload_format_indicator:
        props[codec.PAYLOAD_FORMAT] = packet.payload_format_indicator
    if packet.message_expiry_interval is not None:
        props[codec.MESSAGE_EXPIRY] = packet.message_expiry_interval
    if packet.content_type is not None:
        props[codec.CONTENT_TYPE] = packet.content_type
    if packet.response_topic is not None:
        props[codec.RESPONSE_TOPIC] = packet.response_topic
    if packet.correlation_data is not None:
        props[codec.CORRELATION_DATA] = packet.correlation_data
    if packet.subscription_ids:
        props[codec.SUBSCRIPTION_ID] = packet.subscription_ids
    if packet.topic_alias is not None:
        props[codec.TOPIC_ALIAS] = packet.topic_alias
    if packet.user_properties:
        props[codec.USER_PROPERTY] = packet.user_properties
    return Publish(
        packet.topic,
        packet.payload,
        int(packet.qos),
        packet.retain,
        packet.duplicate,
        packet.packet_id or 0,
        props or None,
    )


def from_publish(
    topic: bytes, payload: bytes, qos: int, retain: bool, packet_id: int, props: Properties | None
) -> bytes:
    """Our ``encode_publish`` arguments through their encoder."""
    kwargs = {_NAMES[ident]: value for ident, value in props.items()} if props else {}
    packet = mqtt5.PublishPacket(
        topic.decode(),
        payload,
        qos=mqtt5.QoS(qos),
        retain=retain,
        packet_id=packet_id if qos else None,
        **kwargs,
    )
    return bytes(packet.write())


def cases(
    topic: bytes, payload: bytes, packet_id: int, props: Properties, marker: Properties
) -> dict[str, Callable[[], object]]:
    v5 = codec.PROTOCOL_5
    plain = codec.encode_publish(topic, payload, 1, False, packet_id, v5)
    with_props = codec.encode_publish(topic, payload, 1, False, packet_id, v5, props)
    # The same bytes both ways, or the comparison is not of the same work.
    assert from_publish(topic, payload, 1, False, packet_id, props) == with_props
    assert to_publish(mqtt5.read(memoryview(with_props))[0]).properties == props
    view0 = memoryview(bytearray(plain))
    view1 = memoryview(bytearray(with_props))
    read = mqtt5.read
    publish = mqtt5.PublishPacket
    qos1 = mqtt5.QoS(1)
    text = topic.decode()
    kwargs = {_NAMES[ident]: value for ident, value in props.items()}
    many = bytearray(plain * 100)

    def parse_read() -> None:
        # Their reader signals "incomplete" with IndexError; ours frames first.
        view = memoryview(many)
        pos = 0
        size = len(many)
        while pos < size:
            packet, used = read(view[pos:])
            to_publish(packet)
            pos += used

    parse_read.per = 100.0  # type: ignore[attr-defined]
    return {
        "mqtt5: decode publish, no properties": lambda: read(view0),
        "mqtt5: decode publish, 3 properties": lambda: read(view1),
        "mqtt5: encode publish, no properties": lambda: publish(
            text, payload, qos=qos1, packet_id=1
        ).write(),
        "mqtt5: encode publish, 3 properties": lambda: publish(
            text, payload, qos=qos1, packet_id=1, **kwargs
        ).write(),
        "mqtt5 via our Publish: decode, no properties": lambda: to_publish(read(view0)[0]),
        "mqtt5 via our Publish: decode, 3 properties": lambda: to_publish(read(view1)[0]),
        "mqtt5 via our Publish: encode, no properties": lambda: from_publish(
            topic, payload, 1, False, 1, None
        ),
        "mqtt5 via our Publish: encode, 3 properties": lambda: from_publish(
            topic, payload, 1, False, 1, props
        ),
        # Their encoder takes no ready-made property block: the marker is encoded each time.
        "mqtt5 via our Publish: encode, hop marker": lambda: from_publish(
            topic, payload, 1, False, 1, marker
        ),
        "mqtt5 via our Publish: frame+decode a read of 100 (per packet)": parse_read,
    }
