"""Decisions about a target connection's messages, without I/O.

httpcore's style: a synchronous function looks at the facts and decides; the async
caller (``target.TargetLink``) does what was decided. Everything here is testable
without a socket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bridge import mqtt_codec as codec
from bridge.outcome import DELIVERED, Outcome

# A message alone in flight this many times when the target dropped the connection is
# refused by the target in the only way it has left: dead-letter it.
POISON_DROPS = 3

QUOTA_EXCEEDED = 0x97
RECEIVE_MAXIMUM_EXCEEDED = 0x93
# Disconnects that can be about the message just sent. Throttling (0x97), takeover
# (0x8E), shutdown (0x8B) and the like are the server's business, not the message's.
MESSAGE_FAULTS = frozenset({None, 0x80, 0x81, 0x82, 0x83, 0x87, 0x90, 0x95, 0x99, 0x9A, 0x9B})
# A drop this long after the probe was sent is not its answer.
PROBE_ANSWER_WITHIN = 5.0


def puback_outcome(reason_code: int, detail: str = "") -> Outcome | None:
    """What a PUBACK settles; None when the message must go again, slower (0x97)."""
    if reason_code < 0x80:
        return DELIVERED
    if reason_code == QUOTA_EXCEEDED:
        return None  # not the message's fault
    return Outcome.rejected(reason_code, detail)


def remaining_expiry(expires_at: float, now: float) -> int:
    """Whole seconds of message expiry left to forward (<= 0: expired)."""
    # (t + n) - t can exceed n by one ulp: without the epsilon, 3600 becomes 3601.
    return math.ceil(expires_at - now - 1e-6)


@dataclass(frozen=True, slots=True)
class DropResponse:
    """What a lost target connection calls for."""

    shrink_window: bool  # 0x93: we sent more than the server's Receive Maximum
    throttle: bool  # 0x97 as a DISCONNECT: slow down
    strike: bool  # blame the message that was alone in flight (one step to poison)
    probe: bool  # after the reconnect, publish one at a time until a PUBACK arrives
    canary: bool  # and prove the connection with a canary publish before the suspect


def on_connection_lost(
    reason: int | None,
    *,
    inflight: int,
    probing: bool,
    lone_age: float | None,
    closed_by_us: bool,
    proven: bool = True,
) -> DropResponse:
    """Decide after a drop. ``lone_age``: seconds since the only in-flight message was
    sent (None unless exactly one was in flight).

    A drop with messages in flight starts probing: one message at a time isolates a
    message the target answers by disconnecting (IoT Core on an unauthorized publish;
    Mosquitto 2.0 after PUBACK 0x87). A strike counts only when the probe was the one
    message in flight, the drop can be about a message, it came soon after the probe,
    we did not end the connection ourselves, and the connection was ``proven`` first (a
    canary publish was acknowledged on it): on a flapping network the first publish after
    each reconnect is cut for reasons of its own, and without the canary a healthy
    message would be blamed three times and dead-lettered.
    """
    fault = reason in MESSAGE_FAULTS and not closed_by_us
    probe = probing or inflight > 0
    strike = (
        probing
        and proven
        and inflight == 1
        and reason in MESSAGE_FAULTS
        and lone_age is not None
        and lone_age < PROBE_ANSWER_WITHIN
        and not closed_by_us
    )
    return DropResponse(
        shrink_window=reason == RECEIVE_MAXIMUM_EXCEEDED,
        throttle=reason == QUOTA_EXCEEDED,
        strike=strike,
        probe=probe,
        canary=probe and fault,
    )


# ---- what a broker's CONNACK allows ------------------------------------------------


def connack_violation(props: codec.Properties) -> tuple[str, str] | None:
    """A CONNACK property MQTT 5 forbids: (what is wrong, metric label), or None.

    Each is a protocol error the client must answer with DISCONNECT 0x82, not a value
    to live with: a Receive Maximum of 0 as a window would stall every message forever.
    """
    if props.get(codec.RECEIVE_MAXIMUM) == 0:
        return "the broker announced Receive Maximum 0, a protocol error", "receive_maximum_zero"
    max_qos = props.get(codec.MAXIMUM_QOS)
    if max_qos is not None and max_qos not in (0, 1):
        return f"the broker announced Maximum QoS {max_qos}, a protocol error", "bad_maximum_qos"
    if props.get(codec.MAXIMUM_PACKET_SIZE) == 0:
        return (
            "the broker announced Maximum Packet Size 0, a protocol error",
            "bad_maximum_packet_size",
        )
    retain = props.get(codec.RETAIN_AVAILABLE)
    if retain is not None and retain not in (0, 1):
        return f"the broker announced Retain Available {retain}, a protocol error", "bad_retain"
    return None


def qos_refusal(server_max_qos: int, needed_qos: int) -> str | None:
    """Why a target connection must not be used, or None.

    A target that takes only QoS 0 would turn every QoS 1 copy into fire-and-forget and
    the source would be acknowledged at once: at-least-once gone without a word. Refuse
    instead, and say what to change.
    """
    if server_max_qos >= needed_qos:
        return None
    return (
        f"the target accepts only QoS {server_max_qos} (Maximum QoS in its CONNACK) but "
        f"routes ask for QoS {needed_qos}: set qos: {server_max_qos} on those routes to "
        "accept losing messages, or use a target that takes QoS 1"
    )
