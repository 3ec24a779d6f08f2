"""The four paths a message can take, each on its own throwaway brokers.

- ``direct``: one broker, publisher → subscriber. The ceiling: no bridge at all.
- ``mosquitto``: broker A, and broker B whose ``connection`` block subscribes to
  ``bench/#`` on A and republishes it locally as ``out/bench/#`` (Mosquitto's built-in
  bridge: C, acknowledges hop by hop, so not end to end), configured as ``in``.
- ``mosquitto-out``: the same bridge defined on the source broker A instead, as ``out``:
  A's bridge client publishes ``bench/#`` to B as ``out/bench/#``.
- ``ours-1``: brokers A and B, one ``mqtt-bridge`` worker (acknowledges A only after B
  acknowledged).
- ``ours-2``: the same with two worker processes in one share group.

Every path publishes on ``bench/…`` at ``source_port`` and is read at ``target_port``
under ``target_prefix + bench/…``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.harness import Mosquitto, Worker, bridge_config

# Every broker in the benchmark: without it, Nagle's algorithm on the broker's sockets
# adds tens of milliseconds to QoS 0 latency, on every path alike.
BROKER_EXTRA = "set_tcp_nodelay true"

PATHS = {
    "direct": "no bridge (ceiling)",
    "mosquitto": "Mosquitto bridge",
    "mosquitto-out": "Mosquitto bridge (out)",
    "ours-1": "mqtt-bridge ×1",
    "ours-2": "mqtt-bridge ×2",
}


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU-seconds of ``procs`` so far (a process that is gone counts 0)."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def machine_busy() -> float:
    """CPU-seconds the whole machine has been busy so far: every process, every core."""
    t = psutil.cpu_times()
    # guest time is already inside user; steal (the hypervisor ran someone else
    # while we wanted the CPU) is noise as much as a neighbour's process is
    parts = ("user", "nice", "system", "irq", "softirq", "steal")
    return float(sum(getattr(t, p, 0.0) for p in parts))


@dataclass
class OpenPath:
    name: str
    source_port: int
    target_port: int
    target_prefix: str
    bridge: list[psutil.Process]  # the processes doing the bridging
    system: list[psutil.Process]  # every broker and bridge process (not the load)
    workers: list[Worker] = field(default_factory=list)
    brokers: dict[str, Mosquitto] = field(default_factory=dict)

    def cpu_seconds(self, which: str = "bridge") -> float:
        return cpu_seconds(self.bridge if which == "bridge" else self.system)

    def peak_rss_mb(self) -> list[float]:
        """Each bridging process's peak resident set (VmHWM) since it started, in MB."""
        out = []
        for proc in self.bridge:
            with contextlib.suppress(OSError, psutil.Error):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out.append(int(line.split()[1]) / 1024.0)
        return out

    def worker_errors(self) -> str:
        return "; ".join(
            f"{w.name}: exited {w.proc.returncode}: {w.log_tail(600)}"
            for w in self.workers
            if w.proc is not None and w.proc.poll() is not None
        )


def mosquitto_bridge_conf(peer_port: int, qos: int, direction: str = "in") -> str:
    """The bridge block: on B as ``in`` (peer = A), or on A as ``out`` (peer = B)."""
    # topic <pattern> <direction> <qos> <local prefix> <remote prefix>
    prefixes = "out/bench/ bench/" if direction == "in" else "bench/ out/bench/"
    return "\n".join(
        [
            BROKER_EXTRA,
            "connection bench-bridge",
            f"address 127.0.0.1:{peer_port}",
            f"topic # {direction} {qos} {prefixes}",
            "try_private false",
            "cleansession true",
            "notifications false",
            "start_type automatic",
            "restart_timeout 1",
        ]
    )


def worker_config(
    source_url: str,
    target_url: str,
    index: int,
    qos: int,
    max_inflight: int | None,
    routes: list[dict[str, object]] | None = None,
    **sections: object,
) -> dict[str, object]:
    """``max_inflight`` None leaves flow.max_inflight to its default (which grows with
    the target pool); ``sections`` are merged into the config (e.g. ``target=``)."""
    route = {"source": "bench/#", "share_group": "bench", "target": "out/{topic}", "qos": qos}
    flow = {} if max_inflight is None else {"max_inflight": max_inflight}
    return bridge_config(
        source_url,
        target_url,
        routes or [route],
        instance_id=f"bench-{index}",
        flow=flow,
        log={"stats_interval": 86400},
        **sections,
    )


@contextlib.contextmanager
def open_path(
    name: str,
    qos: int,
    wd: Path,
    max_inflight: int | None = 1000,
    routes: list[dict[str, object]] | None = None,
    label: str = "",
    source_extra: str = "",
    **sections: object,
) -> Iterator[OpenPath]:
    """``routes``, ``sections`` and ``max_inflight`` shape our workers (worker_config);
    ``source_extra`` is added to broker A's configuration; ``label`` names the folder."""
    wd = wd / f"{name}-q{qos}{label}"
    wd.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if name == "direct":
            broker = stack.enter_context(Mosquitto(wd, "broker", extra=BROKER_EXTRA))
            proc = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
            yield OpenPath(name, broker.port, broker.port, "", [], [proc], brokers={"A": broker})
            return
        if name == "mosquitto-out":
            b = stack.enter_context(Mosquitto(wd, "B", extra=BROKER_EXTRA))
            a = stack.enter_context(
                Mosquitto(wd, "A", extra=mosquitto_bridge_conf(b.port, qos, "out"))
            )
            pa, pb = (psutil.Process(m.proc.pid) for m in (a, b))  # type: ignore[union-attr]
            yield OpenPath(name, a.port, b.port, "out/", [pa], [pa, pb], brokers={"A": a, "B": b})
            return
        a = stack.enter_context(Mosquitto(wd, "A", extra=f"{BROKER_EXTRA}\n{source_extra}"))
        if name == "mosquitto":
            b = stack.enter_context(Mosquitto(wd, "B", extra=mosquitto_bridge_conf(a.port, qos)))
            pa, pb = (psutil.Process(m.proc.pid) for m in (a, b))  # type: ignore[union-attr]
            yield OpenPath(name, a.port, b.port, "out/", [pb], [pa, pb], brokers={"A": a, "B": b})
            return
        b = stack.enter_context(Mosquitto(wd, "B", extra=BROKER_EXTRA))
        count = {"ours-1": 1, "ours-2": 2}[name]
        workers = [
            Worker(wd, worker_config(a.url, b.url, i, qos, max_inflight, routes, **sections))
            for i in range(count)
        ]
        for w in workers:
            stack.callback(w.stop)
        for w in workers:
            w.start()
        procs = [psutil.Process(w.proc.pid) for w in workers]  # type: ignore[union-attr]
        brokers = [psutil.Process(m.proc.pid) for m in (a, b)]  # type: ignore[union-attr]
        yield OpenPath(
            name,
            a.port,
            b.port,
            "out/",
            procs,
            brokers + procs,
            workers,
            {"A": a, "B": b},
        )
