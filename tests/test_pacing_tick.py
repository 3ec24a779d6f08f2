"""The pool-wide pacing tick: paced connections that wait for tokens are resumed together,
on one timer, and each writes a tick's worth of messages at once."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

from bridge.pacing import Pacing, Ticker
from bridge.target import TargetLink
from tests.fakes import max_in_window
from tests.test_links import ENDPOINT, OPTIONS, Factory, FakeConnection, Outcomes, envelope


async def test_the_ticker_resumes_no_one_early_on_few_timers() -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker(0.01)
    rng = random.Random(7)
    woke: dict[int, float] = {}
    due: dict[int, float] = {}

    def resume(n: int) -> None:
        woke[n] = loop.time()

    callbacks = {n: (lambda n=n: resume(n)) for n in range(200)}  # type: ignore[misc]
    for n, callback in callbacks.items():
        wait = rng.uniform(0.0, 0.05)
        due[n] = loop.time() + wait
        ticker.after(wait, callback)
    for n in range(0, 200, 10):  # cancelled: never called
        ticker.cancel(callbacks[n])
    ticker.after(0.02, callbacks[5])  # a new wait replaces the old one
    due[5] = max(due[5], loop.time() + 0.02)
    await asyncio.sleep(0.2)
    assert sorted(woke) == [n for n in range(200) if n % 10]
    assert all(woke[n] >= due[n] - 1e-6 for n in woke)
    # 180 waits within 50 ms: at most one timer per 10 ms slot (not one per wait).
    assert ticker.ticks <= 7


@dataclass
class CountingConnection(FakeConnection):
    """Counts the writes: a flush is one write of everything published since the last."""

    unflushed: int = 0
    writes: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def publish(self, *args: object, **kwargs: object) -> int:
        self.unflushed += 1
        self.times.append(asyncio.get_running_loop().time())
        return super().publish(*args, **kwargs)  # type: ignore[arg-type]

    def flush(self) -> None:
        if self.unflushed:
            self.writes.append(self.unflushed)
            self.unflushed = 0


class CountingFactory(Factory):
    def __call__(self, options, listener):  # type: ignore[no-untyped-def]
        conn = CountingConnection(options, listener)
        self.made.append(conn)
        return conn


async def test_paced_connections_write_several_messages_per_tick_in_order() -> None:
    ticker = Ticker(0.02)
    pacing = Pacing(publish_rate=100, burst=0.1)
    outcomes = [Outcomes() for _ in range(20)]
    factories = [CountingFactory() for _ in range(20)]
    links = [
        TargetLink(
            i,
            ENDPOINT,
            OPTIONS,
            100,
            1.0,
            pacing,
            outcomes[i],
            factory=factories[i],
            ticker=ticker,
        )
        for i in range(20)
    ]
    runners = [asyncio.create_task(link.run()) for link in links]
    try:
        conns = [await factory.connected(1) for factory in factories]
        for link in links:
            for n in range(60):  # a 10-message burst, then 50 at the rate
                link.submit(envelope(n, qos=0))
        for _ in range(300):
            if all(len(o.seen) == 60 for o in outcomes):
                break
            await asyncio.sleep(0.01)
    finally:
        for link in links:
            await link.close()
        for runner in runners:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    for seen in outcomes:
        assert [payload for payload, _ in seen.seen] == [str(n).encode() for n in range(60)]
    writes = [w for conn in conns for w in conn.writes]  # type: ignore[attr-defined]
    assert sum(writes) == 20 * 60
    # 50 waits for tokens per connection, 1,000 in all: one timer per tick serves them
    # all, and a connection writes the messages of a tick together (it wrote each
    # paced message alone, on its own timer, before).
    times = [conn.times for conn in conns]  # type: ignore[attr-defined]
    span = max(t[-1] for t in times) - min(t[0] for t in times)
    assert ticker.ticks <= span / ticker.period + 5
    # The burst went out as it was submitted, one write per message (at once, no tick).
    paced = [w for conn in conns for w in conn.writes[10:]]  # type: ignore[attr-defined]
    assert sum(paced) / len(paced) >= 1.8
    # Still paced: 10 at once, then 100 per second, never more in any second.
    for sent in times:
        assert sent[-1] - sent[0] >= 50 / 100 - 0.02
        assert max_in_window(sent) <= 100


async def test_a_retuned_ticker_still_resumes_every_waiter() -> None:
    ticker = Ticker(0.05)
    woke: list[int] = []
    callbacks = [lambda n=n: woke.append(n) for n in range(3)]  # type: ignore[misc]
    for callback in callbacks:
        ticker.after(0.03, callback)
    ticker.retune(0.01)  # e.g. a reload lowered the burst
    assert ticker.period == 0.01
    await asyncio.sleep(0.2)
    assert sorted(woke) == [0, 1, 2]
