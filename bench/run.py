"""`make bench`: throughput, latency, CPU and memory of four paths, side by side.

Paths (bench/paths.py): no bridge (the ceiling), Mosquitto's built-in bridge, our
bridge with one worker, our bridge with two workers in one share group. For each
QoS (0, 1) and payload size (200 B, 4 KB):

1. throughput: ``--messages`` numbered messages from ``--publishers`` C publishers at
   full speed, ``--repeats`` times; the median is the figure;
2. latency: half that median rate, paced, for ``--latency-seconds``;
3. CPU-seconds per 100k messages of the bridging processes, and their peak RSS;
4. lost / duplicated / out-of-order from the numbered payloads, every run.

Then the generator alone (no subscriber), the shapes users run (bench/shapes.py:
``--shapes``), and the memory scenario (bench/memory.py). Results: ``results.json``,
``results.md`` and PNG plots in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, shapes
from bench.load import Procs
from bench.paths import BROKER_EXTRA, PATHS, OpenPath, machine_busy, open_path
from tests.harness import ROOT, Mosquitto, workdir


@dataclass
class Settings:
    messages: int
    repeats: int
    latency_seconds: float
    publishers: int
    sizes: list[int]
    qos: list[int]
    paths: list[str]
    memory_messages: int
    max_inflight: int
    stall: float
    out: Path
    quick: bool
    profile: bool
    profile_seconds: float
    shapes: list[str]


@dataclass
class Bench:
    settings: Settings
    wd: Path
    procs: Procs = field(default_factory=Procs)
    run_id: int = 0

    def next_tag(self) -> tuple[int, str]:
        self.run_id += 1
        return self.run_id, f"bench-r{self.run_id}"

    def files(self, size: int, counts: list[int]) -> list[list[Path]]:
        return load.lane_files(self.wd / "load", size, counts)


class ForeignLoad:
    """How busy the machine was with processes that are not the benchmark's, in cores.

    Machine busy time (every CPU, all but idle and iowait) minus the benchmark's own:
    this process, its finished children (publishers, subscribers: ``RUSAGE_CHILDREN``)
    and the live brokers and workers (``system_cpu``, sampled by the caller).
    """

    def __init__(self, system_cpu: float) -> None:
        self.t0 = time.monotonic()
        self.busy0 = machine_busy()
        self.own0 = self._own() + system_cpu

    @staticmethod
    def _own() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def cores(self, system_cpu: float) -> float:
        elapsed = max(1e-9, time.monotonic() - self.t0)
        busy = machine_busy() - self.busy0
        own = self._own() + system_cpu - self.own0
        return max(0.0, busy - own) / elapsed


def log(text: str) -> None:
    print(text, flush=True)


def _bridge_counter(path: OpenPath, name: str) -> float:
    total = 0.0
    for w in path.workers:
        with contextlib.suppress(RuntimeError):
            total += w.metrics().get(name, 0.0)
    return total


def run_once(
    bench: Bench,
    path: OpenPath,
    qos: int,
    size: int,
    rate: float | None,
    count: int,
    prefix: str = "bench",
) -> dict[str, Any]:
    """One run: throughput at full speed (``rate`` None) or latency at ``rate`` msg/s.

    The publishers' topics are ``<prefix>/r<run>/t<i>``."""
    s = bench.settings
    k, tag = bench.next_tag()
    topics = [f"{prefix}/r{k}/t{i}" for i in range(s.publishers)]
    counts = load.spread(count, s.publishers)
    out = bench.wd / f"{tag}.out"
    sub = load.Subscriber(
        bench.procs, path.target_port, f"{path.target_prefix}{prefix}/r{k}/#", qos, out, tag
    )
    try:
        sub.wait_path(path.source_port, f"{prefix}/r{k}/probe", qos, timeout=20)
        dropped0 = _bridge_counter(path, "dropped")
        cpu0, sys0 = path.cpu_seconds("bridge"), path.cpu_seconds("system")
        others = ForeignLoad(sys0)
        timeout = 60 + count / 500
        if rate is None:
            files = bench.files(size, counts)
            pub = load.publish_files(
                bench.procs, path.source_port, topics, files, counts, qos, tag, timeout
            )
        else:
            pub = load.publish_paced(
                bench.procs, path.source_port, topics, counts, qos, size, rate, tag, timeout
            )
        sub.wait_bytes(count * (size + load.LINE_OVERHEAD), s.stall, timeout, None)
        cpu1, sys1 = path.cpu_seconds("bridge"), path.cpu_seconds("system")
        dropped = _bridge_counter(path, "dropped") - dropped0
    finally:
        sub.stop()
    # after the subscriber exited, so that its CPU counts as the benchmark's own
    foreign = others.cores(path.cpu_seconds("system"))
    d = load.account(out, counts, stamped=rate is not None)
    out.unlink(missing_ok=True)
    elapsed = max(1e-9, d.last_recv - pub.started) if d.unique else float("nan")
    per100k = 100_000 / d.unique if d.unique else float("nan")
    result: dict[str, Any] = {
        "run": k,
        "mode": "throughput" if rate is None else "latency",
        "offered": count,
        "offered_rate": rate,
        "publish_ok": pub.ok,
        "publish_errors": pub.errors,
        "publish_seconds": round(pub.finished - pub.started, 3),
        "publish_rate": round(count / max(1e-9, pub.finished - pub.started)),
        "delivered": d.delivered,
        "unique": d.unique,
        "lost": d.lost,
        "duplicated": d.duplicated,
        "out_of_order": d.out_of_order,
        "unexpected": d.unexpected,
        "bridge_dropped": dropped,
        "seconds": round(elapsed, 3),
        "msg_per_s": round(d.unique / elapsed) if d.unique else 0,
        "cpu_bridge_per_100k": round((cpu1 - cpu0) * per100k, 3),
        "cpu_system_per_100k": round((sys1 - sys0) * per100k, 3),
        "foreign_cores": round(foreign, 2),
    }
    if rate is not None and d.latencies_ms:
        lat = sorted(d.latencies_ms)
        result |= {
            "p50_ms": round(load.percentile(lat, 50), 3),
            "p99_ms": round(load.percentile(lat, 99), 3),
            "p999_ms": round(load.percentile(lat, 99.9), 3),
            "max_ms": round(lat[-1], 3),
            # 201 quantiles (0, 0.5 … 100 %) for the CDF plot
            "quantiles_ms": [round(load.percentile(lat, q / 2), 3) for q in range(201)],
        }
    if not pub.ok:
        result["note"] = "publisher failed: lost counts exclude nothing, read with care"
    return result


def run_cell(bench: Bench, path: OpenPath, qos: int, size: int) -> dict[str, Any]:
    s = bench.settings
    cell: dict[str, Any] = {"path": path.name, "qos": qos, "size": size, "runs": []}
    for _ in range(s.repeats):
        r = run_once(bench, path, qos, size, None, s.messages)
        cell["runs"].append(r)
        log(
            f"  {path.name:9} qos{qos} {size:5}B  throughput {r['msg_per_s']:>7} msg/s"
            f"  lost {r['lost']} dup {r['duplicated']} dropped {r['bridge_dropped']:.0f}"
            f"  cpu/100k {r['cpu_bridge_per_100k']:.2f}s  other load {r['foreign_cores']:.2f} cores"
        )
    rates = [r["msg_per_s"] for r in cell["runs"]]
    cell["msg_per_s"] = round(statistics.median(rates))
    cell["cpu_bridge_per_100k"] = statistics.median(r["cpu_bridge_per_100k"] for r in cell["runs"])
    cell["cpu_system_per_100k"] = statistics.median(r["cpu_system_per_100k"] for r in cell["runs"])
    rate = max(100.0, cell["msg_per_s"] / 2)
    # one mosquitto_pub process per publisher here: stay below its message-id wrap
    count = min(max(1000, int(rate * s.latency_seconds)), load.MAX_PER_PROCESS * s.publishers)
    lat = run_once(bench, path, qos, size, rate, count)
    cell["latency"] = lat
    cell["runs"].append(lat)
    log(
        f"  {path.name:9} qos{qos} {size:5}B  latency @ {rate:.0f} msg/s:"
        f" p50 {lat.get('p50_ms', float('nan')):.2f} p99 {lat.get('p99_ms', float('nan')):.2f}"
        f" p99.9 {lat.get('p999_ms', float('nan')):.2f} ms  lost {lat['lost']}"
        f"  other load {lat['foreign_cores']:.2f} cores"
    )
    for key in ("lost", "duplicated", "out_of_order", "unexpected", "bridge_dropped"):
        cell[key] = sum(r[key] for r in cell["runs"])
    cell["not_delivered"] = cell.pop("lost")
    # QoS 0 has no acknowledgement: what did not arrive was dropped, not lost.
    cell["lost"] = cell["not_delivered"] if qos == 1 else 0
    cell["publish_ok"] = all(r["publish_ok"] for r in cell["runs"])
    cell["foreign_cores_max"] = max(r["foreign_cores"] for r in cell["runs"])
    peaks = path.peak_rss_mb()
    cell["peak_rss_mb"] = round(max(peaks), 1) if peaks else None
    cell["peak_rss_mb_total"] = round(sum(peaks), 1) if peaks else None
    return cell


def run_generator(bench: Bench, qos: int, size: int) -> dict[str, Any]:
    """The publishers alone, into a broker with no subscriber: the load's own ceiling."""
    s = bench.settings
    # at least ~20 MB of payload, so that process start and exit do not dominate
    total = max(s.messages, min(200_000, 20_000_000 // size))
    counts = load.spread(total, s.publishers)
    files = bench.files(size, counts)
    _, tag = bench.next_tag()
    with Mosquitto(bench.wd / "generator", f"gen-q{qos}-s{size}", BROKER_EXTRA) as broker:
        topics = [f"bench/gen/t{i}" for i in range(s.publishers)]
        pub = load.publish_files(
            bench.procs, broker.port, topics, files, counts, qos, tag, 60 + total / 500
        )
    rate = round(total / max(1e-9, pub.finished - pub.started))
    log(f"  generator qos{qos} {size:5}B  {rate:>7} msg/s published (no subscriber)")
    return {
        "qos": qos,
        "size": size,
        "messages": total,
        "msg_per_s": rate,
        "ok": pub.ok,
        "errors": pub.errors,
    }


def environment() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        return "?"

    commit = version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
        "kernel": platform.release(),
        "mosquitto": version(["mosquitto", "-h"]),
        "bridge_commit": commit,
    }


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="a ~4 minute sanity run (shapes included)")
    p.add_argument("--messages", type=int, help="messages per throughput run (50000; quick 10000)")
    p.add_argument("--repeats", type=int, help="throughput runs per cell, median kept (3; quick 1)")
    p.add_argument("--latency-seconds", type=float, help="length of a latency run (4; quick 2)")
    p.add_argument("--publishers", type=int, default=4, help="publisher processes/topics (4)")
    p.add_argument("--sizes", default="200,4096", help="payload sizes in bytes (200,4096)")
    p.add_argument("--qos", default="0,1", help="QoS levels (0,1)")
    p.add_argument(
        "--paths",
        default="direct,mosquitto,ours-1,ours-2",
        help=f"subset of {','.join(PATHS)} (mosquitto-in = mosquitto)",
    )
    p.add_argument(
        "--memory-messages",
        type=int,
        help="messages offered while the target is down (1000000; quick 100000; 0 skips)",
    )
    p.add_argument("--max-inflight", type=int, default=1000, help="our flow.max_inflight (1000)")
    p.add_argument("--stall", type=float, default=3.0, help="seconds without delivery = done")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="output folder")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one worker with py-spy under QoS 1 load (pip install py-spy)",
    )
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument(
        "--shapes",
        default=",".join(shapes.SHAPES),
        help=f"the issue-15 shapes to run after the table, subset of {','.join(shapes.SHAPES)}"
        " ('' for none; bench/shapes.py)",
    )
    a = p.parse_args(argv)
    # mosquitto-in: the explicit name of the `mosquitto` path (its bridge is on B, as in)
    paths = [{"mosquitto-in": "mosquitto"}.get(x, x) for x in a.paths.split(",") if x]
    unknown = [x for x in paths if x not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {','.join(unknown)}; choose from {','.join(PATHS)}")
    return Settings(
        messages=a.messages or (10_000 if a.quick else 50_000),
        repeats=a.repeats or (1 if a.quick else 3),
        latency_seconds=a.latency_seconds or (2.0 if a.quick else 4.0),
        publishers=a.publishers,
        sizes=[int(x) for x in a.sizes.split(",") if x],
        qos=[int(x) for x in a.qos.split(",") if x],
        paths=paths,
        memory_messages=(
            a.memory_messages
            if a.memory_messages is not None
            else (100_000 if a.quick else 1_000_000)
        ),
        max_inflight=a.max_inflight,
        stall=a.stall,
        out=a.out,
        quick=a.quick,
        profile=a.profile,
        profile_seconds=a.profile_seconds,
        shapes=shapes.parse(a.shapes, p),
    )


def main(argv: list[str] | None = None) -> int:
    load.require_clients()
    s = parse_args(argv)
    from bench import memory, report  # matplotlib is imported only when needed

    s.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()},
        "environment": environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "generator": [],
        "cells": [],
        "errors": [],
    }
    log(f"mqtt-bridge bench: {s.messages} msgs/run × {s.repeats}, results in {s.out}")
    with workdir("mqtt-bridge-bench-") as wd:
        bench = Bench(s, wd)
        try:
            if s.paths:
                log("generator alone:")
            for qos in s.qos if s.paths else []:
                for size in s.sizes:
                    results["generator"].append(run_generator(bench, qos, size))
            for name in s.paths:
                for qos in s.qos:
                    log(f"{PATHS[name]}, QoS {qos}:")
                    try:
                        with open_path(name, qos, wd, s.max_inflight) as path:
                            for size in s.sizes:
                                results["cells"].append(run_cell(bench, path, qos, size))
                    except Exception as exc:  # one broken path must not hide the others
                        msg = f"{name} qos{qos}: {type(exc).__name__}: {exc}"
                        log(f"  ERROR {msg[:600]}")
                        results["errors"].append({"where": f"{name} qos{qos}", "error": msg})
                        traceback.print_exc(limit=3)
                    finally:
                        bench.procs.close()
            shapes.run(bench, results, s.shapes, run_once, run_cell, log)
            if s.profile:
                results["profile"] = profile(bench, s)
            if s.memory_messages > 0:
                log(f"memory: target down, {s.memory_messages} messages offered to the source")
                try:
                    results["memory"] = memory.run(bench.wd, bench.procs, s, log)
                except Exception as exc:
                    log(f"  ERROR memory: {type(exc).__name__}: {exc}")
                    results["errors"].append({"where": "memory", "error": repr(exc)})
                    traceback.print_exc(limit=3)
        finally:
            bench.procs.close()
    results["seconds"] = round(time.time() - started, 1)
    report.write(results, s.out)
    log(f"\nwrote {s.out}/results.json, results.md and plots in {results['seconds']:.0f} s\n")
    print((s.out / "results.md").read_text())
    lost = sum(c["lost"] for c in results["cells"]) + results.get("memory", {}).get("lost", 0)
    lost += shapes.lost(results)
    return 1 if results["errors"] or lost else 0


def profile(bench: Bench, s: Settings) -> dict[str, Any]:
    """py-spy on one worker while it bridges QoS 1, 200 B at full speed."""
    from bench import profiling

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        log("profile: py-spy not installed (pip install py-spy): skipped")
        return {"skipped": "py-spy not installed"}
    return profiling.run(bench, s, spy, log)


if __name__ == "__main__":
    raise SystemExit(main())
