"""How fast one target connection may go: token buckets for messages and bytes, the
in-flight window, and the throttle response (multiplicative decrease, additive recovery).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Callable
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


# The cap's window: one second as IoT Core counts it, plus 1 % so that a few ms of
# scheduling jitter between our write and the broker's read cannot put one message
# too many into some second (costs at most 1 % of the rate).
WINDOW = 1.01


class WindowCap:
    """At most ``limit`` sends in any ``window`` seconds, counted when they are written.

    IoT Core counts what arrives in each second, not what a bucket granted: a full
    bucket plus a second's refill lets ``rate x (1 + burst)`` through some 1 s window, and
    an event-loop stall bunched granted messages further (119 at rate 100 measured on
    the wire). The cap remembers the last ``limit`` write times and holds the next send
    until the oldest of them is ``window`` seconds old, so no 1 s window ever holds more
    than ``limit``, whatever the loop did meanwhile.

    A send is recorded when it is granted and moved to its write time by ``written``:
    the caller does not write each message at once (the connection writes what a loop
    iteration queued in one call), and a stall between grant and write must not make
    the record older than the bytes on the wire.
    """

    def __init__(self, limit: int, window: float = WINDOW) -> None:
        self.limit = max(1, limit)
        self.window = window
        self._sent: deque[float] = deque(maxlen=self.limit)
        self._unwritten = 0  # the newest records: granted, write time not known yet

    def delay(self, now: float) -> float:
        """0 when a send may go now, else the seconds until one may."""
        sent = self._sent
        if len(sent) < self.limit:
            return 0.0
        return max(0.0, sent[0] + self.window - now)

    def sent(self, now: float) -> None:
        self._sent.append(now)  # the deque's maxlen drops the oldest
        self._unwritten += 1

    def written(self, now: float) -> None:
        """Every send granted so far has been written, at ``now`` at the latest."""
        sent = self._sent
        for i in range(1, min(self._unwritten, len(sent)) + 1):
            sent[-i] = now  # later than the grant: the order of the records holds
        self._unwritten = 0

    def set_limit(self, limit: int) -> None:
        limit = max(1, limit)
        if limit != self.limit:
            self.limit = limit
            self._sent = deque(self._sent, maxlen=limit)
            self._unwritten = min(self._unwritten, limit)


# The pool-wide pacing tick, in seconds: paced connections waiting for tokens are
# resumed together on a grid of this period. At 100 msg/s a connection then writes 2
# messages per tick in one write, and the pool runs one timer, not one per message (a
# write and a timer per message were 33 % + 17 % of the CPU at 100 paced connections).
# Coarser ticks batch more but cost rate: the cap allows `limit` sends per WINDOW, and
# sends only on the grid fit 1/TICK of them in ceil(WINDOW/TICK) ticks (50/51 at 0.02 s,
# 20/21 at 0.05 s).
TICK = 0.02


def tick_for(pacing: Pacing) -> float:
    """The tick for ``pacing``: at most half a bucket's worth, so a tick's tokens always
    fit in the bucket (a 10 ms burst must not lose rate to a 20 ms tick)."""
    return max(0.001, min(TICK, pacing.burst / 2))


class Ticker:
    """One timer for all the paced connections of a pool.

    ``after(wait, resume)`` calls ``resume()`` on the first tick at least ``wait`` seconds
    from now. Ticks sit on a grid (multiples of ``period`` of the loop clock), so
    connections that ran out of tokens at slightly different moments wake up together,
    each with a tick's worth of tokens to write at once.
    """

    def __init__(self, period: float = TICK) -> None:
        self.period = period
        self._loop = asyncio.get_running_loop()
        self._slots: dict[int, dict[Callable[[], None], None]] = {}
        self._slot_of: dict[Callable[[], None], int] = {}
        self._heap: list[int] = []  # slot numbers; some may have emptied since
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = -1
        self.ticks = 0

    def after(self, wait: float, resume: Callable[[], None]) -> None:
        self.cancel(resume)
        slot = math.ceil((self._loop.time() + wait) / self.period)
        waiting = self._slots.get(slot)
        if waiting is None:
            waiting = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
        waiting[resume] = None
        self._slot_of[resume] = slot
        if self._timer is None or slot < self._timer_slot:
            self._arm(slot)

    def cancel(self, resume: Callable[[], None]) -> None:
        slot = self._slot_of.pop(resume, None)
        if slot is not None:
            self._slots[slot].pop(resume, None)

    def retune(self, period: float) -> None:
        """A new period (a live reload changed the burst). Whoever waits is resumed on
        the new grid's first tick, and computes its wait again."""
        if period != self.period:
            waiting = list(self._slot_of)
            self.close()
            self.period = period
            for resume in waiting:
                self.after(0.0, resume)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slots.clear()
        self._slot_of.clear()
        self._heap.clear()

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._loop.call_at(slot * self.period, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.ticks += 1
        heap, slots = self._heap, self._slots
        due = math.floor(self._loop.time() / self.period + 1e-6)
        ready: list[Callable[[], None]] = []
        while heap and heap[0] <= due:
            for resume in slots.pop(heapq.heappop(heap), ()):
                del self._slot_of[resume]
                ready.append(resume)
        for resume in ready:
            resume()  # may call after() again: for a later slot, never this one
        while heap and not slots.get(heap[0]):
            slots.pop(heapq.heappop(heap), None)
        if heap and self._timer is None:
            self._arm(heap[0])


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
        self._cap = _cap(None, pacing.publish_rate)
        self.paced = self._messages is not None or self._bytes is not None

    def repace(self, pacing: Pacing, now: float) -> None:
        """New rates (a live reload). Tokens earned so far stay (up to the new capacity), and
        a throttle still in force applies to the new rate as it did to the old one."""
        self.pacing = pacing
        self._messages = _bucket(self._messages, pacing.publish_rate, pacing.burst, now)
        self._bytes = _bucket(self._bytes, pacing.bytes_rate, pacing.burst, now)
        self._cap = _cap(self._cap, pacing.publish_rate)
        self.paced = self._messages is not None or self._bytes is not None
        self.window = self._window_cap  # the throttle moves to the rate when newly paced
        self.recover(now)

    @property
    def rate_limit(self) -> float:
        """The publish rate currently allowed (0 when unpaced)."""
        return self._messages.rate if self._messages is not None else 0.0

    def delay(self, size: int, now: float) -> float:
        """Take the tokens for one message of ``size`` bytes and return 0, or return the
        seconds to wait (taking nothing). A 0 counts as a send at ``now`` until the caller
        says when it was written (``written``)."""
        messages = self._messages
        wait = messages.delay(1, now) if messages is not None else 0.0
        if not wait and self._bytes is not None:
            wait = self._bytes.delay(size, now)
            if wait and messages is not None:
                messages.tokens += 1  # give back: nothing was sent
        cap = self._cap
        if not wait and cap is not None:
            wait = cap.delay(now)
            if not wait:
                cap.sent(now)
            else:  # give back: nothing was sent
                if messages is not None:
                    messages.tokens += 1
                if self._bytes is not None:
                    self._bytes.tokens += size
        return wait

    def written(self, now: float) -> None:
        """What was granted has been written, at ``now`` at the latest (see WindowCap)."""
        if self._cap is not None:
            self._cap.written(now)

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


def _cap(cap: WindowCap | None, rate: float | None) -> WindowCap | None:
    """The hard cap for the configured (not throttled) ``rate``, keeping its history."""
    if not rate:
        return None
    limit = math.floor(rate)  # per 1 s window: 100 at rate 100, never 101
    if cap is None:
        return WindowCap(limit)
    cap.set_limit(limit)
    return cap


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
