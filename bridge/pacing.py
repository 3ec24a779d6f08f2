"""How fast one target connection may go: token buckets for messages and bytes, the
in-flight window, and the throttle response (multiplicative decrease, additive recovery).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pacing:
    publish_rate: float | None = None  # messages/s per connection
    bytes_rate: float | None = None  # bytes/s per connection
    burst: float = 1.0  # seconds' worth of tokens a bucket holds
    connect_interval: float = 0.0  # minimum seconds between CONNECTs of one client id


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst`` seconds' worth.

    A request larger than the bucket passes once the bucket is full and leaves it in
    debt, so oversized items are delayed rather than stuck, and the average holds.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * burst)
        self.tokens = self.capacity
        self.stamp = now

    def delay(self, amount: float, now: float) -> float:
        """Take ``amount`` and return 0, or return the seconds to wait before trying again."""
        self.refill(now)
        needed = min(amount, self.capacity)
        if self.tokens >= needed:
            self.tokens -= amount
            return 0.0
        return (needed - self.tokens) / self.rate

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def set_rate(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * burst)
        self.tokens = min(self.tokens, self.capacity)


class Throttle:
    """The share of the configured rate a connection may use after quota errors.

    Each 0x97 halves it (down to 1/64); it climbs back by 10 % of the full rate per
    second without a new one.
    """

    FLOOR = 1 / 64
    RECOVERY_PER_SECOND = 0.10

    def __init__(self) -> None:
        self._factor_at = 1.0
        self._since = 0.0
        self.events = 0

    def factor(self, now: float) -> float:
        return min(1.0, self._factor_at + (now - self._since) * self.RECOVERY_PER_SECOND)

    def hit(self, now: float) -> float:
        self.events += 1
        self._factor_at = max(self.FLOOR, self.factor(now) / 2)
        self._since = now
        return self._factor_at


class Pacer:
    """One connection's speed limits. Throttling lowers the publish rate when the
    connection is paced, else the window; both climb back as the throttle recovers."""

    def __init__(self, pacing: Pacing, window: int, now: float) -> None:
        self.pacing = pacing
        self.max_window = window
        self.window = window
        # The window before throttling: ours, capped by the server's Receive Maximum.
        self._window_cap = window
        self._throttle = Throttle()
        self._messages = _bucket(None, pacing.publish_rate, pacing.burst, now)
        self._bytes = _bucket(None, pacing.bytes_rate, pacing.burst, now)
        self.paced = self._messages is not None or self._bytes is not None

    def repace(self, pacing: Pacing, now: float) -> None:
        """New rates (a live reload). Tokens earned so far stay (up to the new capacity), and
        a throttle still in force applies to the new rate as it did to the old one."""
        self.pacing = pacing
        self._messages = _bucket(self._messages, pacing.publish_rate, pacing.burst, now)
        self._bytes = _bucket(self._bytes, pacing.bytes_rate, pacing.burst, now)
        self.paced = self._messages is not None or self._bytes is not None
        self.window = self._window_cap  # the throttle moves to the rate when newly paced
        self.recover(now)

    @property
    def rate_limit(self) -> float:
        """The publish rate currently allowed (0 when unpaced)."""
        return self._messages.rate if self._messages is not None else 0.0

    def delay(self, size: int, now: float) -> float:
        """Take the tokens for one message of ``size`` bytes and return 0, or return the
        seconds to wait (taking nothing)."""
        messages = self._messages
        wait = messages.delay(1, now) if messages is not None else 0.0
        if not wait and self._bytes is not None:
            wait = self._bytes.delay(size, now)
            if wait and messages is not None:
                messages.tokens += 1  # give back: nothing was sent
        return wait

    def connected(self, server_receive_maximum: int, now: float) -> None:
        """A new connection: the window is capped by what the server announced."""
        self.window = self._window_cap = min(self.max_window, server_receive_maximum)
        self.recover(now)  # a throttle outlives the connection

    def throttled(self, now: float) -> None:
        """A quota-exceeded answer (0x97): slow down."""
        self._use_factor(self._throttle.hit(now))

    def recover(self, now: float) -> None:
        if self._throttle.events:
            self._use_factor(self._throttle.factor(now))

    def shrink_window(self) -> None:
        """The server said we exceeded its Receive Maximum (0x93): halve the window for good."""
        self.max_window = max(1, self.window // 2)
        self.window = self._window_cap = self.max_window

    def _use_factor(self, factor: float) -> None:
        """Run at ``factor`` of full speed: the publish rate when paced, else the window."""
        if self._messages is not None and self.pacing.publish_rate:
            self._messages.set_rate(self.pacing.publish_rate * factor, self.pacing.burst)
        else:
            self.window = max(1, math.ceil(self._window_cap * factor))


def _bucket(
    bucket: TokenBucket | None, rate: float | None, burst: float, now: float
) -> TokenBucket | None:
    """A bucket for ``rate`` (None: unpaced), keeping what ``bucket`` has earned."""
    if not rate:
        return None
    if bucket is None:
        return TokenBucket(rate, burst, now)
    bucket.refill(now)  # at the old rate, up to now
    bucket.set_rate(rate, burst)
    return bucket
