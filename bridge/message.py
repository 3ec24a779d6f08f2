"""The envelope that flows from the source to a target connection and back to the ack."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.acks import Pending
from bridge.mqtt_codec import Properties, Publish


@dataclass(slots=True, eq=False)
class Envelope:
    source_topic: str
    topic: bytes  # target topic, already encoded
    payload: bytes  # exactly the bytes the source sent
    qos: int  # target QoS
    retain: bool
    properties: Properties | bytes | None  # bytes: already encoded (the hop marker alone)
    received_at: float  # event-loop time
    expires_at: float | None  # event-loop time, from the message expiry interval
    route: int
    pending: Pending
    source: Publish  # the message as received: the archive records it unchanged
    received_epoch: float
    # Times the target dropped the connection while this message was alone in flight.
    drops: int = 0
    seq: int = 0  # submission order on its target connection: requeues keep it
    sent_at: float = 0.0  # event-loop time of the last PUBLISH of it
