"""The shapes users run (issue 15), measured after the main table of ``make bench``.

- ``iot``: one worker, 200 target connections paced like AWS IoT Core (100 msg/s each,
  burst 0.1, window 100), QoS 1, 20,000 and then 2,000 device topics, offered more than
  the pacing allows; achieved ÷ allowed and the busiest connection ÷ the mean, over a
  steady window that leaves out start-up.
- ``routes``: 500 routes with every message matching the last one, against 1 route.
- ``qos0``: a 50,000-message QoS 0 flood at full speed: the share delivered, ours
  (default ``flow.qos0_when_full: block``) and Mosquitto's bridge.
- ``archive``: ``backup.s3.mode: required`` ÷ ``best_effort`` (bench/archive.py's run).
- ``bridge``: 1 topic, 1 route, 1 connection, 200 B, QoS 1: ours ÷ Mosquitto's bridge
  configured on the target broker (``in``) and on the source broker (``out``).
- ``latency``: p50 added over no bridge at 50 % and 75 % of our maximum rate, for ours
  and both Mosquitto bridge configurations at those same offered rates.
- ``pacing``: what a broker behind paced connections sees: the most PUBLISH packets any
  connection put on the wire in any 1 s window (a counting proxy in front of the target).

Every shape returns a dict with ``lost`` (QoS 1, acknowledged by the source and never
delivered: must be 0); bench/summary.py turns them into the issue's table.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import psutil

from bench import fanout, load
from bench.paths import (
    BROKER_EXTRA,
    OpenPath,
    cpu_seconds,
    machine_busy,
    open_path,
    worker_config,
)
from bridge.limits import AWS_IOT_LIMITS
from tests.fakes import CountingProxy, max_in_window
from tests.harness import Mosquitto, Worker, parse_metrics

SHAPES = ("iot", "routes", "qos0", "archive", "bridge", "latency", "pacing")

IOT_CONNECTIONS = 200
IOT_RATE = 100.0  # IoT Core's publishes per second per connection
IOT_OFFERED = 25_000  # msg/s: more than the 20,000 the pacing allows
IOT_TOPICS = (20_000, 2_000)
ROUTES = 500
# QoS 1 as the table says; its 1-route baseline (54k msg/s) looks like a QoS 0 figure
ROUTES_QOS = 1
FLOOD = 50_000
SIZE = 200

# bench.run's run_once and run_cell, handed in (bench.run imports this module)
RunOnce = Callable[..., dict[str, Any]]
RunCell = Callable[..., dict[str, Any]]


def _aws_pacing() -> dict[str, Any]:
    # The aws-iot profile needs mqtts://; the harness brokers are plain TCP, so its
    # pacing limits are given one by one instead.
    return {k: AWS_IOT_LIMITS[k] for k in ("publish_rate", "bytes_rate", "burst", "inflight")}


def _published(path: OpenPath) -> tuple[dict[str, float], float]:
    """Per target connection: messages it got acknowledged (the worker's counter); and
    the messages in flight in the worker."""
    port = path.workers[0].http_port
    # a worker at full load answers slowly (Worker.metrics gives up after 2 s)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        metrics = parse_metrics(answer.read().decode())
    published = {k: v for k, v in metrics.items() if k.startswith("connection_published{")}
    return published, metrics.get("inflight_messages", 0.0)


def iot_core(bench: Any, topics_count: int, log: Callable[[str], None]) -> dict[str, Any]:
    s = bench.settings
    seconds, warmup = (4.0, 1.5) if s.quick else (12.0, 3.0)
    per_topic = max(1, round(IOT_OFFERED * seconds / topics_count))
    total = per_topic * topics_count
    allowed = IOT_CONNECTIONS * IOT_RATE
    route = {"source": "dev/+/data", "target": "out/dev/{1}/data", "qos": 1}
    target = {"connections": IOT_CONNECTIONS, "limits": _aws_pacing()}
    _, tag = bench.next_tag()
    out = bench.wd / f"{tag}.out"
    with open_path(
        "ours-1", 1, bench.wd, None, [route], label=f"-iot{topics_count}", target=target
    ) as path:
        sub = load.Subscriber(bench.procs, path.target_port, "out/dev/#", 1, out, tag)
        source = psutil.Process(path.brokers["A"].proc.pid)  # type: ignore[union-attr]
        try:
            sub.wait_path(path.source_port, "dev/probe/data", 1, timeout=30)
            topics = [f"dev/{i}/data" for i in range(topics_count)]
            blob = fanout.encode(topics, per_topic, SIZE, 1)
            box: dict[str, Any] = {}
            begun = threading.Event()
            timeout = 120 + total / 2000

            def offer() -> None:
                box["pub"] = fanout.publish(
                    path.source_port, blob, len(topics), per_topic, 1, IOT_OFFERED,
                    f"{tag}-pub", timeout, begun,
                )  # fmt: skip

            thread = threading.Thread(target=offer, name="iot-offer", daemon=True)
            thread.start()
            begun.wait(30)
            # The steady window: from `warmup` after the first message to the end of the
            # offer (wall clock, as the subscriber stamps its receipts).
            w0 = time.time() + warmup
            w1 = w0 - warmup + seconds
            time.sleep(warmup)
            cpu0, a0, (m0, inflight0) = path.cpu_seconds(), cpu_seconds([source]), _published(path)
            t0, busy0 = time.monotonic(), machine_busy()
            time.sleep(max(0.5, w1 - time.time()))
            cpu1, a1, (m1, inflight1) = path.cpu_seconds(), cpu_seconds([source]), _published(path)
            t1, busy1 = time.monotonic(), machine_busy()
            thread.join(timeout)
            # a paced worker with a backlog can pause for seconds on a loaded machine
            stall = max(s.stall, 15.0)
            sub.wait_bytes(total * (SIZE + load.LINE_OVERHEAD), stall, timeout, None)
        finally:
            sub.stop()
        drained = time.time()
    pub: load.PublishResult = box["pub"]
    d = load.account(out, pub.counts, stamped=False)
    achieved = load.received_between(out, w0, w1) / (w1 - w0)
    out.unlink(missing_ok=True)
    # Who did the work, from the worker's counter: each scrape takes a while on a busy
    # worker, so the shares are read from it, and the rate from the subscriber.
    deltas = [m1[key] - m0.get(key, 0.0) for key in m1]
    mean = statistics.fmean(deltas) if deltas else 0.0
    result = {
        "topics": topics_count,
        "connections": IOT_CONNECTIONS,
        "rate_per_connection": IOT_RATE,
        "allowed": allowed,
        "offered_rate": IOT_OFFERED,
        "offered": total,
        "publish_rate": round(total / max(1e-9, pub.finished - pub.started)),
        "publish_ok": pub.ok,
        "publish_errors": pub.errors,
        "window_seconds": round(w1 - w0, 2),
        "achieved": round(achieved),
        "achieved_vs_allowed": round(achieved / allowed, 3),
        # The same, from the worker's counters between its two scrapes: the target
        # acknowledged these (a gap to "achieved" is in the subscriber's path).
        "worker_published_rate": round(sum(deltas) / (t1 - t0)),
        "busiest_vs_mean": round(max(deltas) / mean, 2) if mean else None,
        "idlest_vs_mean": round(min(deltas) / mean, 2) if mean else None,
        "worker_cores": round((cpu1 - cpu0) / (w1 - w0), 2),
        # at the two scrapes: how much of flow.max_inflight (20,000) the pool had to work with
        "worker_inflight": [int(inflight0), int(inflight1)],
        # the source broker holds the backlog: near 1 core, it is what limits the run
        "source_broker_cores": round((a1 - a0) / (w1 - w0), 2),
        # Everything on the machine (brokers, subscriber, generator, worker): at the
        # machine's core count, the run is CPU-bound as a whole, whatever the pool does.
        "machine_cores": round((busy1 - busy0) / (t1 - t0), 2),
        "machine_cores_total": psutil.cpu_count(),
        "total_seconds": round(drained - pub.started, 1),
        "unique": d.unique,
        "lost": d.lost,
        "duplicated": d.duplicated,
        "out_of_order": d.out_of_order,
    }
    log(
        f"  iot {topics_count:>6} topics: {result['achieved']} msg/s = "
        f"{result['achieved_vs_allowed']:.2f} of {allowed:.0f} allowed, busiest "
        f"{result['busiest_vs_mean']}× mean, worker {result['worker_cores']} cores, "
        f"in flight {result['worker_inflight']}, "
        f"source broker {result['source_broker_cores']} cores, "
        f"lost {d.lost} dup {d.duplicated} order inv. {d.out_of_order}"
    )
    return result


def many_routes(bench: Any, run_once: RunOnce, log: Callable[[str], None]) -> dict[str, Any]:
    s = bench.settings
    routes = [
        {
            "source": f"bench/route{i}/#",
            "share_group": "bench",
            "target": "out/{topic}",
            "qos": ROUTES_QOS,
        }
        for i in range(ROUTES)
    ]
    prefix = f"bench/route{ROUTES - 1}"  # matches the last route only
    runs: dict[str, Any] = {}
    for chosen in (routes[-1:], routes):
        label = f"{len(chosen)} route" + ("s" if len(chosen) > 1 else "")
        with open_path(
            "ours-1", ROUTES_QOS, bench.wd, s.max_inflight, chosen, label=f"-routes{len(chosen)}"
        ) as path:
            rs = [
                run_once(bench, path, ROUTES_QOS, SIZE, None, s.messages, prefix=prefix)
                for _ in range(s.repeats)
            ]
        rate = round(statistics.median(r["msg_per_s"] for r in rs))
        runs[label] = {"routes": len(chosen), "msg_per_s": rate, "runs": rs}
        log(f"  {label:>10}: {rate} msg/s  lost {sum(r['lost'] for r in rs)}")
    one, many = runs["1 route"], runs[f"{ROUTES} routes"]
    return {
        "routes": ROUTES,
        "qos": ROUTES_QOS,
        "one": one,
        "many": many,
        "ratio": round(many["msg_per_s"] / max(1, one["msg_per_s"]), 2),
        # QoS 0 has no acknowledgement: what did not arrive was dropped, not lost
        "lost": sum(r["lost"] for v in runs.values() for r in v["runs"]) if ROUTES_QOS else 0,
    }


def qos0_flood(bench: Any, run_once: RunOnce, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": FLOOD, "lost": 0}
    for name in ("ours-1", "mosquitto"):
        with open_path(name, 0, bench.wd, bench.settings.max_inflight, label="-flood") as path:
            r = run_once(bench, path, 0, SIZE, None, FLOOD)
        r["delivered_ratio"] = round(r["unique"] / FLOOD, 4)
        out[name] = r
        log(
            f"  {name:9} QoS 0 flood: {r['unique']} of {FLOOD} delivered "
            f"({100 * r['delivered_ratio']:.1f} %), bridge dropped {r['bridge_dropped']:.0f}"
        )
    return out


def archive_modes(bench: Any, log: Callable[[str], None]) -> dict[str, Any]:
    from bench import archive  # boto3 and moto: only when this shape runs

    args = archive.parser().parse_args(
        ["--messages", str(20_000 if bench.settings.quick else 50_000)]
    )
    summary = archive.measure(args)
    log(f"  required ÷ best_effort: {summary['required_vs_best_effort']}")
    return summary


def _cell(results: dict[str, Any], path: str) -> dict[str, Any] | None:
    for c in results["cells"]:
        if c["path"] == path and c["qos"] == 1 and c["size"] == SIZE:
            return c
    return None


def bridge_configs(
    bench: Any, results: dict[str, Any], run_cell: RunCell, log: Callable[[str], None]
) -> dict[str, Any]:
    """Ours ÷ Mosquitto's bridge in both configurations, reusing the main table's cells
    where it measured them (same run, same conditions)."""
    cells = {}
    for name in ("ours-1", "mosquitto", "mosquitto-out"):
        cell = _cell(results, name)
        if cell is None:
            log(f"  {name}: QoS 1, {SIZE} B (not in the main table)")
            with open_path(name, 1, bench.wd, bench.settings.max_inflight, label="-1t") as path:
                cell = run_cell(bench, path, 1, SIZE)
            bench.procs.close()
        cells[name] = cell
    ours = cells["ours-1"]["msg_per_s"]
    out = {name: {"msg_per_s": c["msg_per_s"], "lost": c["lost"]} for name, c in cells.items()}
    out["vs_in"] = round(ours / max(1, cells["mosquitto"]["msg_per_s"]), 2)
    out["vs_out"] = round(ours / max(1, cells["mosquitto-out"]["msg_per_s"]), 2)
    out["lost"] = sum(c["lost"] for c in cells.values())
    log(f"  ours ÷ Mosquitto's bridge: in {out['vs_in']}, out {out['vs_out']}")
    return out


def added_latency(
    bench: Any, results: dict[str, Any], run_once: RunOnce, log: Callable[[str], None]
) -> dict[str, Any]:
    s = bench.settings
    ours = results.get("shapes", {}).get("bridge", {}).get("ours-1") or _cell(results, "ours-1")
    if ours is None:
        with open_path("ours-1", 1, bench.wd, s.max_inflight, label="-max") as path:
            ours = run_once(bench, path, 1, SIZE, None, s.messages)
    top = ours["msg_per_s"]
    fractions = (0.5, 0.75)
    p50: dict[str, dict[str, float]] = {}
    lost = 0
    for name in ("direct", "mosquitto", "mosquitto-out", "ours-1"):
        p50[name] = {}
        with open_path(name, 1, bench.wd, s.max_inflight, label="-lat") as path:
            for f in fractions:
                rate = top * f
                count = min(
                    max(1000, int(rate * s.latency_seconds)),
                    load.MAX_PER_PROCESS * s.publishers,
                )
                r = run_once(bench, path, 1, SIZE, rate, count)
                p50[name][str(f)] = r.get("p50_ms", float("nan"))
                lost += r["lost"]
        log(f"  {name:13} p50 at 50 % / 75 % of {top} msg/s: {p50[name]}")
    added = {
        name: {f: round(v - p50["direct"][f], 3) for f, v in p50[name].items()}
        for name in ("mosquitto", "mosquitto-out", "ours-1")
    }
    ratios = {
        other: {
            f: round(added["ours-1"][f] / added[other][f], 2) if added[other][f] > 0 else None
            for f in added[other]
        }
        for other in ("mosquitto", "mosquitto-out")
    }
    return {"our_max": top, "p50_ms": p50, "added_ms": added, "ratios": ratios, "lost": lost}


def pacing_on_the_wire(bench: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """4 paced connections offered twice their rate; a proxy stamps each PUBLISH."""
    s = bench.settings
    connections, seconds = 4, (4.0 if s.quick else 8.0)
    offered = 2 * connections * IOT_RATE
    count = int(offered * seconds)
    wd = bench.wd / "pacing"
    wd.mkdir(parents=True, exist_ok=True)
    k, tag = bench.next_tag()
    out = bench.wd / f"{tag}.out"
    with (
        Mosquitto(wd, "A", extra=BROKER_EXTRA) as a,
        Mosquitto(wd, "B", extra=BROKER_EXTRA) as b,
        CountingProxy(b.port, wd) as proxy,
    ):
        cfg = worker_config(
            a.url, proxy.url, 0, 1, None,
            target={"connections": connections, "limits": _aws_pacing()},
            heartbeat={"enabled": False},  # its publishes would count too
        )  # fmt: skip
        worker = Worker(wd, cfg)
        try:
            worker.start()
            sub = load.Subscriber(bench.procs, b.port, f"out/bench/r{k}/#", 1, out, tag)
            try:
                sub.wait_path(a.port, f"bench/r{k}/probe", 1, timeout=20)
                topics = [f"bench/r{k}/t{i}" for i in range(s.publishers)]
                counts = load.spread(count, s.publishers)
                pub = load.publish_paced(
                    bench.procs, a.port, topics, counts, 1, SIZE, offered, tag, 60 + seconds
                )
                sub.wait_bytes(count * (SIZE + load.LINE_OVERHEAD), s.stall, 60 + 2 * seconds, None)
            finally:
                sub.stop()
        finally:
            worker.stop()
    d = load.account(out, counts, stamped=False)
    out.unlink(missing_ok=True)
    busiest = {cid: max_in_window(sorted(times)) for cid, times in proxy.publishes.items()}
    result = {
        "connections": connections,
        "rate": IOT_RATE,
        "burst": AWS_IOT_LIMITS["burst"],
        "offered_rate": offered,
        "max_in_1s_window": max(busiest.values(), default=0),
        "per_connection": busiest,
        "publish_ok": pub.ok,
        "unique": d.unique,
        "lost": d.lost,
        "duplicated": d.duplicated,
    }
    log(
        f"  pacing {IOT_RATE:.0f}/s, burst {AWS_IOT_LIMITS['burst']}: at most "
        f"{result['max_in_1s_window']} PUBLISH in any 1 s on one connection; lost {d.lost}"
    )
    return result


def run(
    bench: Any,
    results: dict[str, Any],
    chosen: list[str],
    run_once: RunOnce,
    run_cell: RunCell,
    log: Callable[[str], None],
) -> None:
    """Each chosen shape into ``results["shapes"]``; a failure is recorded, not raised."""
    shapes = results.setdefault("shapes", {})
    steps: dict[str, Callable[[], Any]] = {
        "iot": lambda: {str(n): iot_core(bench, n, log) for n in IOT_TOPICS},
        "routes": lambda: many_routes(bench, run_once, log),
        "qos0": lambda: qos0_flood(bench, run_once, log),
        "archive": lambda: archive_modes(bench, log),
        "bridge": lambda: bridge_configs(bench, results, run_cell, log),
        "latency": lambda: added_latency(bench, results, run_once, log),
        "pacing": lambda: pacing_on_the_wire(bench, log),
    }
    for name in chosen:
        log(f"shape {name}:")
        started = time.monotonic()
        try:
            shapes[name] = steps[name]()
            shapes[name]["seconds"] = round(time.monotonic() - started, 1)
        except Exception as exc:  # one broken shape must not hide the others
            msg = f"shape {name}: {type(exc).__name__}: {exc}"
            log(f"  ERROR {msg[:600]}")
            results["errors"].append({"where": f"shape {name}", "error": msg})
        finally:
            bench.procs.close()


def parse(text: str, parser: argparse.ArgumentParser) -> list[str]:
    chosen = [x for x in text.split(",") if x]
    unknown = [x for x in chosen if x not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {','.join(unknown)}; choose from {','.join(SHAPES)}")
    return chosen


def lost(results: dict[str, Any]) -> int:
    total = 0
    for value in results.get("shapes", {}).values():
        if "lost" in value:
            total += value["lost"]
        else:  # iot: one result per topic count
            total += sum(v["lost"] for v in value.values() if isinstance(v, dict))
    return total
