"""Token buckets and the throttle response (multiplicative decrease, additive recovery)."""

from __future__ import annotations


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
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        needed = min(amount, self.capacity)
        if self.tokens >= needed:
            self.tokens -= amount
            return 0.0
        return (needed - self.tokens) / self.rate

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
