"""The ``reason`` label values a worker can produce, known before the first event.

/metrics shows each of them at 0 from the start. A series that appears only with its
first event starts at that count, and ``increase()`` over it is 0: an alert on "any dead
letter in 10 minutes" would miss the first ones (seen with 3 dead letters). The alerts
are also written to survive a series that appears late (a reason not listed here).
"""

from __future__ import annotations

from bridge.limits import TopicLimits
from bridge.outcome import POISON, TOO_LARGE, UNENCODABLE
from bridge.policy import POISON_DROPS

DROP_REASONS = ("full", "loop", "expired")

# PUBACK failure codes MQTT 5 allows a broker to send (3.4.2.1), but 0x97, which is retried.
PUBACK_FAILURES = (0x80, 0x83, 0x87, 0x90, 0x91, 0x99)

NO_ROUTE = "no_route"  # counted on the first route: a message no route matches has no route

THROTTLE_REASONS = ("quota_exceeded", "disconnect_quota_exceeded")
# What a peer that breaks MQTT can do to a connection (protocol_errors_total{reason}):
# policy.connack_violation's labels, an oversize packet, malformed bytes.
PROTOCOL_ERROR_REASONS = (
    "malformed_packet",
    "packet_too_large",
    "receive_maximum_zero",
    "bad_maximum_qos",
    "bad_maximum_packet_size",
    "bad_retain",
)

# DISCONNECT reasons from a target worth an alert or a look (names as in reason_name()).
DISCONNECT_REASONS = (
    "session_taken_over",
    "receive_maximum_exceeded",
    "quota_exceeded",
    "server_shutting_down",
    "administrative_action",
    "keep_alive_timeout",
    "not_authorized",
)


def dead_letter_reasons(limits: TopicLimits, target_v5: bool) -> list[str]:
    """Dead-letter labels a route of this worker can produce."""
    reasons = [outcome.dead_letter_reason(POISON_DROPS)[1] for outcome in (POISON, TOO_LARGE)]
    reasons.append(UNENCODABLE.dead_letter_reason(POISON_DROPS)[1])
    reasons.append("reserved_topic")
    if limits.max_payload is not None:
        reasons.append("payload_too_large")
    if limits.max_topic_bytes is not None:
        reasons.append("topic_too_long")
    if limits.max_topic_slashes is not None:
        reasons.append("topic_too_deep")
    if target_v5:  # an MQTT 3.1.1 PUBACK carries no reason code
        reasons += [f"rejected_0x{code:02x}" for code in PUBACK_FAILURES]
    return reasons
