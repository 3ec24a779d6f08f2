"""Balanced pinning: a topic stays on one connection while it has messages there, an idle
topic goes to the least busy connection, and order per topic holds under 200 connections."""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections import defaultdict

from hypothesis import given
from hypothesis import strategies as st

from bridge.balance import Balancer
from bridge.message import Envelope
from bridge.outcome import DELIVERED, Outcome
from bridge.pacing import Pacing
from bridge.target import TargetLink, TargetPool
from tests.conftest import Rig
from tests.harness import Collector, Publisher, check
from tests.test_links import ENDPOINT, OPTIONS, Factory, FakeConnection, envelope


def test_a_topic_stays_pinned_while_it_has_messages_out() -> None:
    balancer = Balancer(3)
    first = balancer.assign(b"a", 1)
    # Other topics make the first connection the busiest...
    balancer.assign(b"b", 1)
    balancer.assign(b"c", 1)
    assert balancer.assign(b"a", 1) == first  # ...but 'a' has a message there: it stays
    balancer.finished(b"a")
    balancer.finished(b"a")
    assert balancer.pinned == 2
    # Idle now: its next message goes to the least busy connection, which is not 'b's or 'c's.
    busy = {balancer.assign(b"b", 1), balancer.assign(b"c", 1)}
    assert balancer.assign(b"a", 1) not in busy


def test_an_idle_qos0_topic_keeps_its_hash_connection() -> None:
    balancer = Balancer(7)
    for _ in range(3):
        assert balancer.assign(b"q0", 0) == zlib.crc32(b"q0") % 7
        balancer.finished(b"q0")
    assert balancer.pinned == 0


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=300))
def test_idle_topics_go_to_the_least_loaded_connection(ops: list[tuple[bool, int]]) -> None:
    # The O(1) bucket bookkeeping agrees with a brute-force count at every step.
    balancer = Balancer(5)
    outstanding: dict[bytes, int] = defaultdict(int)
    where: dict[bytes, int] = {}
    for finish, n in ops:
        topic = str(n).encode()
        if finish and outstanding[topic]:
            balancer.finished(topic)
            outstanding[topic] -= 1
            continue
        least = min(balancer.load)
        link = balancer.assign(topic, 1)
        if outstanding[topic]:
            assert link == where[topic]
        else:
            assert balancer.load[link] - 1 == least
        where[topic] = link
        outstanding[topic] += 1
        loads = [0] * 5
        for t, count in outstanding.items():
            loads[where[t]] += count
        assert balancer.load == loads
    assert balancer.pinned == sum(1 for count in outstanding.values() if count)


async def test_order_per_topic_holds_under_200_connections() -> None:
    """A scripted broker answers the 200 connections in a random interleaving while new
    messages keep coming; each topic's messages must reach it in order, and the load
    spreads where a hash would pile several busy topics on one connection."""
    rng = random.Random(15)
    factory = Factory()
    finished: list[Envelope] = []

    def done(env: Envelope, outcome: Outcome) -> None:
        assert outcome is DELIVERED
        finished.append(env)

    links = [
        TargetLink(i, ENDPOINT, OPTIONS, 10, 1.0, Pacing(), done, factory=factory)
        for i in range(200)
    ]
    pool = TargetPool(links)
    topics = [f"dev/{i}".encode() for i in range(400)]
    next_n = dict.fromkeys(topics, 0)
    arrived: dict[bytes, list[int]] = defaultdict(list)
    cursor: dict[int, int] = defaultdict(int)  # per connection: PUBLISHes the broker read
    async with pool:
        for _ in range(500):
            if len(factory.made) == 200 and all(link.connected for link in links):
                break
            await asyncio.sleep(0.01)
        conns: list[FakeConnection] = factory.made
        for _ in range(40_000):
            if rng.random() < 0.5:
                topic = rng.choice(topics)
                pool.submit(envelope(next_n[topic], topic))
                next_n[topic] += 1
                continue
            # The broker reads the next PUBLISH of one connection and acknowledges it.
            ready = [c for c in rng.sample(conns, 8) if cursor[id(c)] < len(c.published)]
            if not ready:
                continue
            conn = ready[0]
            pid, topic, payload = conn.published[cursor[id(conn)]]
            cursor[id(conn)] += 1
            arrived[topic].append(int(payload))
            link = links[conns.index(conn)]
            link.on_puback(conn, pid, 0)
        # Drain: the broker reads everything left.
        while any(cursor[id(c)] < len(c.published) for c in conns):
            for i, conn in enumerate(conns):
                while cursor[id(conn)] < len(conn.published):
                    pid, topic, payload = conn.published[cursor[id(conn)]]
                    cursor[id(conn)] += 1
                    arrived[topic].append(int(payload))
                    links[i].on_puback(conn, pid, 0)
        for link in links:
            await link.close()
    for topic in topics:
        assert arrived[topic] == list(range(next_n[topic])), topic  # all, once, in order
    assert len(finished) == sum(next_n.values())
    assert pool.balancer.pinned == 0
    assert sum(pool.balancer.load) == 0
    # Topics moved between connections (the pinning is not by hash)...
    used = defaultdict(set)
    for i, conn in enumerate(conns):
        for _, topic, _ in conn.published:
            used[topic].add(i)
    assert sum(len(c) > 1 for c in used.values()) > len(topics) // 2
    # ...and the busiest connection carried far less over the mean than a hash puts on it.
    counts = [len(c.published) for c in conns]
    hashed = [0] * 200
    for topic, n in next_n.items():
        hashed[zlib.crc32(topic) % 200] += n
    mean = sum(counts) / len(counts)
    print(f"busiest/mean balanced {max(counts) / mean:.2f}, hashed {max(hashed) / mean:.2f}")
    assert max(counts) / mean < 2.0
    assert max(hashed) / mean > 2.5  # the test's topics are skewed enough to tell


def test_many_real_connections_keep_order_per_topic(rig: Rig) -> None:
    # 64 target connections on a real Mosquitto, windows of 5 so that topics do go idle
    # and move; every topic's messages must still arrive in order, none lost.
    routes = [{"source": f"{rig.prefix}/#", "target": "out/{topic}"}]
    worker = rig.worker(routes, target={"connections": 64, "limits": {"inflight": 5}})
    topics = [f"{rig.prefix}/d{i}" for i in range(300)]
    with (
        Collector(rig.target.url, "out/#") as collector,
        Publisher(rig.source.url) as pub,
    ):
        pub.publish_numbered(topics, 15_000)
        pub.wait_acked(120)
        collector.wait_for(15_000, 120)
        time.sleep(0.5)
        report = check(pub.acked(), collector.messages, lambda t: f"out/{t}")
    print(report)
    metrics = worker.metrics()
    assert report.expected == 15_000
    assert report.lost == 0, report.lost_examples
    assert report.unexpected == 0
    assert report.out_of_order == 0
    busy = [metrics[f"connection_published{{connection={i}}}"] for i in range(64)]
    assert sum(busy) == 15_000 + report.duplicated
    print(f"busiest/mean {max(busy) / (sum(busy) / 64):.2f}")


def test_the_load_index_shrinks_back_when_a_backlog_drains() -> None:
    # A connection that piled up 5,000 messages (its target was slow) must not leave
    # 5,000 load levels behind once they are acknowledged.
    balancer = Balancer(3)
    for _ in range(5000):
        balancer.assign(b"stuck", 1)
    assert len(balancer._by_load) == 5001
    for _ in range(5000):
        balancer.finished(b"stuck")
    assert len(balancer._by_load) == 1
    assert balancer.load == [0, 0, 0]
