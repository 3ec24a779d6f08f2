"""Memory scenario: the target broker is down while a large backlog is offered.

1. Brokers A (source) and B (target), one worker (``flow.max_inflight``), and a
   persistent subscriber session on B (``mosquitto_sub -c``), proven by a probe.
2. B stops (SIGTERM: Mosquitto saves the subscriber's session).
3. ``--memory-messages`` QoS 1 messages of 32 bytes are published to A; each publisher
   exits 0 only after A acknowledged all its messages.
4. B starts again on the same port; the subscriber reconnects to its session.
5. Everything must arrive: lost = 0.

A sampler records the worker's RSS (and the source broker's, where the backlog lives)
every 0.25 s for the timeline.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import load
from bench.load import Procs
from bench.paths import BROKER_EXTRA, worker_config
from tests.harness import Mosquitto, Worker, wait_until

SIZE = 32


class Sampler(threading.Thread):
    def __init__(self, procs: dict[str, psutil.Process], interval: float = 0.25) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.procs = procs
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self.events: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def mark(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.t0, 2), what))

    def run(self) -> None:
        while not self._halt.is_set():
            row = {"t": round(time.monotonic() - self.t0, 2)}
            for name, proc in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    row[name] = round(proc.memory_info().rss / 2**20, 2)
            self.samples.append(row)
            self._halt.wait(self.interval)

    def replace(self, name: str, proc: psutil.Process) -> None:
        self.procs = {**self.procs, name: proc}

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _pid(m: Mosquitto) -> psutil.Process:
    assert m.proc is not None
    return psutil.Process(m.proc.pid)


def run(wd: Path, procs: Procs, s: Any, log: Callable[[str], None]) -> dict[str, Any]:
    n = int(s.memory_messages)
    wd = wd / "memory"
    wd.mkdir(parents=True, exist_ok=True)
    counts = load.spread(n, s.publishers)
    files = load.lane_files(wd / "load", SIZE, counts)
    topics = [f"bench/mem/t{i}" for i in range(s.publishers)]
    sub_filter, sub_id = "out/bench/mem/#", "bench-mem-sub"
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(Mosquitto(wd, "A", extra=BROKER_EXTRA))
        b = stack.enter_context(Mosquitto(wd, "B", extra=BROKER_EXTRA))
        worker = Worker(wd, worker_config(a.url, b.url, 0, 1, s.max_inflight))
        stack.callback(worker.stop)
        worker.start()
        assert worker.proc is not None
        sampler = Sampler({"worker": psutil.Process(worker.proc.pid), "source broker": _pid(a)})
        stack.callback(sampler.stop)

        # A persistent session on B that outlives B's restart.
        probe_out = wd / "probe.out"
        sub = load.Subscriber(procs, b.port, sub_filter, 1, probe_out, sub_id, persistent=True)
        try:
            sub.wait_path(a.port, "bench/mem/probe", 1, timeout=20)
        finally:
            sub.stop()

        sampler.start()
        time.sleep(1.0)
        sampler.mark("target stopped")
        b.stop()
        wait_until(lambda: worker.metrics().get("ready", 1) == 0, 15, what="worker not ready")
        sampler.mark("offering")
        t_offer = time.time()
        pub = load.publish_files(
            procs, a.port, topics, files, counts, 1, "bench-mem", timeout=120 + n / 1000
        )
        offer_rate = n / max(1e-9, pub.finished - t_offer)
        sampler.mark("offered (all acked by source)")
        log(
            f"  offered {n} to the source in {pub.finished - t_offer:.1f} s"
            f" ({offer_rate:.0f} msg/s), ok={pub.ok}"
        )
        time.sleep(2.0)
        during = worker.metrics()
        outage_samples = [r["worker"] for r in sampler.samples if "worker" in r]
        b.start()
        t_up = time.time()
        sampler.mark("target back")
        out = wd / "mem.out"
        sub = load.Subscriber(procs, b.port, sub_filter, 1, out, sub_id, persistent=True)
        try:
            sub.wait_bytes(n * (SIZE + load.LINE_OVERHEAD), 20.0, 120 + n / 2000, None)
        finally:
            sub.stop()
        sampler.mark("drained")
        time.sleep(1.0)
        sampler.stop()
        d = load.account(out, counts, stamped=False)
        out.unlink(missing_ok=True)

    worker_rss = [r["worker"] for r in sampler.samples if "worker" in r]
    source_rss = [r["source broker"] for r in sampler.samples if "source broker" in r]
    baseline = statistics.median(worker_rss[:4]) if worker_rss else float("nan")
    drain_s = d.last_recv - t_up if d.unique else float("nan")
    result = {
        "messages": n,
        "payload": SIZE,
        "max_inflight": s.max_inflight,
        "publish_ok": pub.ok,
        "publish_errors": pub.errors,
        "offer_rate": round(offer_rate),
        "inflight_while_down": during.get("inflight_messages"),
        "received_while_down": during.get("received"),
        # From the worker's last log line (the peak is not a gauge: scrapes miss it).
        "inflight_peak": next(
            (e.get("inflight_peak") for e in reversed(worker.logged("bridge.left"))), None
        ),
        "delivered": d.delivered,
        "unique": d.unique,
        "lost": d.lost,
        "duplicated": d.duplicated,
        "out_of_order": d.out_of_order,
        "drain_seconds": round(drain_s, 1),
        "drain_rate": round(d.unique / drain_s) if d.unique and drain_s > 0 else 0,
        "worker_rss_baseline_mb": round(baseline, 1),
        "worker_rss_max_while_down_mb": round(max(outage_samples, default=float("nan")), 1),
        "worker_rss_max_mb": round(max(worker_rss, default=float("nan")), 1),
        "source_broker_rss_max_mb": round(max(source_rss, default=float("nan")), 1),
        "timeline": sampler.samples,
        "events": sampler.events,
    }
    log(
        f"  worker RSS {result['worker_rss_baseline_mb']} MB at start,"
        f" ≤ {result['worker_rss_max_while_down_mb']} MB while the target was down,"
        f" ≤ {result['worker_rss_max_mb']} MB overall; source broker peak"
        f" {result['source_broker_rss_max_mb']} MB; in flight while down:"
        f" {result['inflight_while_down']}"
    )
    log(
        f"  after the target returned: {d.unique}/{n} delivered in {drain_s:.1f} s"
        f" ({result['drain_rate']} msg/s), lost {d.lost}, duplicated {d.duplicated}"
    )
    return result
