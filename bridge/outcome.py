"""What became of one envelope at the target: the result a write carries back.

One small value per answer instead of integers that mix sentinels with MQTT reason
codes. The common outcomes are shared constants, so the hot path allocates nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bridge import mqtt_codec as codec


class Kind(enum.Enum):
    DELIVERED = "delivered"  # acknowledged with a success code (QoS 1) or handed over (QoS 0)
    EXPIRED = "expired"  # its message expiry ran out before it could be sent
    POISON = "poison"  # the target dropped the connection on it, again and again
    TOO_LARGE = "too_large"  # over the Maximum Packet Size the target announced
    UNENCODABLE = "unencodable"  # cannot be an MQTT packet at all (a topic over 65535 bytes)
    REJECTED = "rejected"  # the target answered with a failure reason code (>= 0x80)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    reason_code: int = 0  # the target's, for REJECTED
    detail: str = ""  # the target's reason string / server reference (MQTT 5)

    @staticmethod
    def rejected(reason_code: int, detail: str = "") -> Outcome:
        return Outcome(Kind.REJECTED, reason_code, detail)

    def dead_letter_reason(self, poison_drops: int) -> tuple[str, str]:
        """(the reason a person reads, the metric label) for an outcome that dead-letters."""
        kind = self.kind
        if kind is Kind.POISON:
            return (
                f"target dropped the connection {poison_drops} times on this message",
                "connection_dropped",
            )
        if kind is Kind.TOO_LARGE:
            return "larger than the target's Maximum Packet Size", "packet_too_large"
        if kind is Kind.UNENCODABLE:
            return "cannot be encoded as an MQTT packet", "unencodable"
        code = self.reason_code
        text = f"rejected: {codec.reason_name(code)} (0x{code:02x})"
        if self.detail:
            text += f"; {self.detail}"
        return text, f"rejected_0x{code:02x}"


DELIVERED = Outcome(Kind.DELIVERED)
EXPIRED = Outcome(Kind.EXPIRED)
POISON = Outcome(Kind.POISON)
TOO_LARGE = Outcome(Kind.TOO_LARGE)
UNENCODABLE = Outcome(Kind.UNENCODABLE)
