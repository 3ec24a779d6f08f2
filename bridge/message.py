"""The envelope that flows from the source to a target connection and back to the ack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.mqtt_codec import Properties, Publish

if TYPE_CHECKING:
    from bridge.flow import AckQueue


@dataclass(slots=True, eq=False)
class Pending:
    """A source message's place in the in-order acknowledgement queue."""

    acks: AckQueue
    packet_id: int
    qos: int
    size: int
    route: int
    done: bool = False
    # What must finish before the source acknowledgement: the target's answer, and in
    # `required` archive mode also the S3 object holding the record.
    holds: int = 1


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
