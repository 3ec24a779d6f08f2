"""What a target can take, checked before publishing: pure functions, no I/O.

AWS IoT Core's published quotas are the ``aws-iot`` profile; any value can be
overridden in ``limits``. A message that breaks a limit can never be accepted, so it
is dead-lettered instead of retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AWS_IOT_LIMITS: dict[str, Any] = {
    "publish_rate": 100.0,  # publishes per second per connection (not adjustable)
    "bytes_rate": 512 * 1024,  # bytes per second per connection (not adjustable)
    "burst": 0.1,  # seconds' worth: a full second would allow 2x the rate in some 1 s window
    "inflight": 100,  # unacknowledged QoS 1 publishes per client
    "max_payload": 128 * 1024,
    "max_topic_bytes": 256,
    "max_topic_slashes": 7,  # the $aws/rules/<rule>/ prefix does not count
    "subscriptions_per_connection": 50,
    "filters_per_subscribe": 8,
    "connect_interval": 1.0,  # CONNECTs per second per client id
    "max_qos": 1,
}
AWS_KEEPALIVE_RANGE = (30, 1200)
AWS_CLIENT_ID_MAX = 128
_RULES_PREFIX = "$aws/rules/"

# Maximum Packet Size: what a broker may send us. MQTT's own ceiling is a 268,435,455
# byte remaining length plus the fixed header.
MQTT_MAX_PACKET = 268_435_455 + 5
MQTT_MIN_PACKET = 4096
# Room around the payload: fixed header, topic, packet id and properties.
PACKET_HEADROOM = 64 * 1024
# A target sends us acknowledgements, never payloads (a stray PUBLISH is answered and
# ignored): anything near this is a broken or hostile peer.
TARGET_PACKET_LIMIT = 1024 * 1024


def source_packet_limit(max_payload: int | None, max_inflight_bytes: int) -> int:
    """The Maximum Packet Size announced to the source broker.

    A message larger than the target takes would only be dead-lettered, and one larger
    than the whole flow would be held alone: neither is worth buffering a packet for.
    So memory is bounded by configuration, not by what a publisher sends.
    """
    payload = min(max_payload, max_inflight_bytes) if max_payload else max_inflight_bytes
    return min(payload + PACKET_HEADROOM, MQTT_MAX_PACKET)


@dataclass(frozen=True, slots=True)
class TopicLimits:
    max_payload: int | None = None
    max_topic_bytes: int | None = None
    max_topic_slashes: int | None = None

    def violation(self, topic: bytes, payload_size: int) -> str | None:
        """The reason the target can never take this message, or None."""
        if not topic:  # a template can render one from an empty capture
            return "invalid_topic: the target topic is empty"
        if self.max_payload is not None and payload_size > self.max_payload:
            return f"payload_too_large: {payload_size} bytes > {self.max_payload}"
        counted = _without_rules_prefix(topic)
        if self.max_topic_bytes is not None and len(counted) > self.max_topic_bytes:
            return f"topic_too_long: {len(counted)} bytes > {self.max_topic_bytes}"
        if self.max_topic_slashes is not None:
            slashes = counted.count(b"/")
            if slashes > self.max_topic_slashes:
                return f"topic_too_deep: {slashes} slashes > {self.max_topic_slashes}"
        if topic.startswith(b"$") and not topic.startswith(_RULES_PREFIX.encode()):
            return "reserved_topic: topics starting with '$' are reserved by the broker"
        return None


def _without_rules_prefix(topic: bytes) -> bytes:
    """``$aws/rules/<rule>/rest`` counts as ``rest`` for AWS's topic limits."""
    if topic.startswith(b"$aws/rules/"):
        parts = topic.split(b"/", 3)
        return parts[3] if len(parts) == 4 else b""
    return topic
